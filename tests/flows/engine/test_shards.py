"""Retention scored in shards, here and on a two-worker Dask cluster: the unsharded numbers exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import FACTS

from flows.config.runner import RunnerSettings, ScoringParams
from flows.engine.base import fetch_base
from flows.engine.shards import ShardedScorer, scorer_for
from flows.engine.workers import BaseIdent, unit_threads
from nas_core.evaluate.counterfact import edit_metrics, score_here
from nas_core.requests import EditRequest, NeighbourhoodPrompt
from nas_core.spec import spec_for


def _requests() -> list[EditRequest]:
    """The tiny facts, each with a paraphrase and two neighbours (about 60 scoring pairs)."""
    out = []
    for i, (_, prompt, subject, new, true) in enumerate(FACTS):
        nb = [NeighbourhoodPrompt(FACTS[(i + k) % len(FACTS)][1].format(FACTS[(i + k) % len(FACTS)][2]),
                                  FACTS[(i + k) % len(FACTS)][4]) for k in (1, 2)]
        out.append(EditRequest(case_id=str(i), prompt=prompt, subject=subject, target_new=new, target_true=true,
                               paraphrase_prompts=(f"In short, {prompt.format(subject)}",),
                               neighbourhood_prompts=tuple(nb)))
    return out


@pytest.fixture(scope="module")
def edited(tiny_folder, tmp_path_factory):
    """The tiny model from its folder with both layers' down_proj moved (an 'edited' model), and its identity."""
    models = tmp_path_factory.mktemp("models")
    source = str(tiny_folder / "tiny-llama")
    base = fetch_base(source, models)
    ident = BaseIdent(source, models, "cpu", "float32", base.base_hash)
    names = tuple(spec_for(base.model).weight_name(layer) for layer in (0, 1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            w = base.model.get_parameter(name)
            w.add_(0.3 * torch.randn(w.shape, generator=gen))
    return base, ident, names


def test_shards_here_give_the_unsharded_metrics(edited):
    base, ident, names = edited
    reqs = _requests()
    with unit_threads(1):
        whole = edit_metrics(base.model, base.tok, reqs, 4, 64)
    scorer = ShardedScorer(3, RunnerSettings(threads=1), ident, names)
    assert edit_metrics(base.model, base.tok, reqs, 4, 64, scorer=scorer) == whole
    assert whole.n_requests == len(reqs) and whole.efficacy_success is not None


def test_the_default_scoring_is_one_pass_here_and_dask_needs_the_base():
    assert scorer_for(ScoringParams(), None, ()) is score_here
    assert isinstance(scorer_for(ScoringParams(shards=2), None, ()), ShardedScorer)
    with pytest.raises(ValueError, match="base model's identity"):
        ShardedScorer(2, RunnerSettings("dask", workers=2))
    with pytest.raises(ValueError, match="shards must be >= 1"):
        ScoringParams(shards=0)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


@pytest.mark.slow
def test_shards_on_two_dask_workers_give_the_unsharded_metrics(edited, cluster):
    from distributed import Client

    base, ident, names = edited
    reqs = _requests()
    with unit_threads(1):
        whole = edit_metrics(base.model, base.tok, reqs, 4, 64)
    runner = RunnerSettings("dask", address=cluster.scheduler_address, threads=1)
    for shards in (2, 5):
        assert edit_metrics(base.model, base.tok, reqs, 4, 64, scorer=ShardedScorer(shards, runner, ident, names)) \
            == whole
    with Client(cluster.scheduler_address) as client:
        holders = client.run(lambda: sorted(__import__("flows.engine.shards", fromlist=["_COPIES"])._COPIES))
    assert len(holders) == 2 and all(v == [ident] for v in holders.values())  # each worker: its own copy, once


@pytest.mark.slow
def test_a_worker_never_scores_another_model_than_the_callers(edited, cluster):
    base, ident, names = edited
    runner = RunnerSettings("dask", address=cluster.scheduler_address, threads=1)
    # The second layer moved again but not sent: the worker's copy would be another model; it says so.
    w = base.model.get_parameter(names[1])
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(0.1)
    try:
        with pytest.raises(RuntimeError, match="hashes to .* the caller's model to"):
            edit_metrics(base.model, base.tok, _requests(), 4, 64, scorer=ShardedScorer(2, runner, ident, names[:1]))
    finally:
        with torch.no_grad():
            w.copy_(before)
