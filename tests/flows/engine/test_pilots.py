"""The NAS anchor's pilot batches here and on a two-worker Dask cluster: the same norms, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import FACTS

from flows.config.model import ConfigError
from flows.config.params import load_params
from flows.config.runner import AnchorParams, RunnerSettings
from flows.engine.base import fetch_base
from flows.engine.caches import ensure_anchor
from flows.engine.pilots import pilot_norms
from flows.engine.workers import BaseIdent, unit_threads
from flows.paths import Paths
from nas_core.anchor import calibrate
from nas_core.requests import EditRequest
from nas_core.settings import MemitSettings, NASSettings, ValueSettings
from nas_core.spec import spec_for
from nas_core.values import optimise_values

REPO = Path(__file__).resolve().parents[3]
VALUES = ValueSettings(steps=6, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
#: Three batches of 3, 3 and 1 pilots: the order of the norms must survive the cluster.
NAS = NASSettings(pilots=7, pilot_batch_size=3)
PILOTS = [EditRequest(f"{key}-{k}", prompt, subject, new if k == 0 else true, true if k == 0 else new)
          for k in (0, 1) for key, prompt, subject, new, true in FACTS][:7]


@pytest.fixture(scope="module")
def base(tiny_folder, tmp_path_factory):
    """The tiny model loaded from its folder, and its identity (what a worker loads)."""
    models = tmp_path_factory.mktemp("models")
    source = str(tiny_folder / "tiny-llama")
    loaded = fetch_base(source, models)
    return loaded, BaseIdent(source, models, "cpu", "float32", loaded.base_hash)


def _reference(loaded, threads: int = 1) -> torch.Tensor:
    """The norms of the three batches cut by hand, each optimised alone (no code of the runners)."""
    with unit_threads(threads):
        spec = spec_for(loaded.model)
        return torch.cat([optimise_values(loaded.model, loaded.tok, spec, PILOTS[a:b], 0, VALUES).v_star.norm(dim=1)
                          for a, b in ((0, 3), (3, 6), (6, 7))])


def test_calibrate_averages_the_pilot_norms_less_the_top_fraction(base):
    loaded, _ = base
    with unit_threads(1):
        cal = calibrate(loaded.model, loaded.tok, spec_for(loaded.model), PILOTS, 0, VALUES,
                        NASSettings(pilots=7, pilot_batch_size=3, drop_top_fraction=0.3))
    norms = _reference(loaded).double().sort().values
    assert cal.norms == tuple(float(x) for x in _reference(loaded)) and cal.dropped == 2
    assert cal.reference_norm == pytest.approx(float(norms[:5].mean()), rel=1e-12)


def test_sequential_pilots_are_the_calibration_norms_with_progress(base):
    loaded, _ = base
    ticks = []
    got = pilot_norms(loaded.model, loaded.tok, PILOTS, 0, VALUES, NAS, RunnerSettings(threads=1),
                      progress=lambda d, t: ticks.append((d, t)))
    assert torch.equal(got.norms, _reference(loaded)) and got.threads == (1,)
    assert ticks == [(3, 7), (6, 7), (7, 7)]


def test_dask_pilots_need_the_base_and_params_name_the_runner(base, tmp_path):
    loaded, _ = base
    with pytest.raises(ValueError, match="base model's identity"):
        pilot_norms(loaded.model, loaded.tok, PILOTS, 0, VALUES, NAS, RunnerSettings("dask", workers=2))
    assert load_params(tmp_path / "absent.yaml").anchor == AnchorParams()
    (tmp_path / "p.yaml").write_text("anchor:\n  runner: {kind: dask, workers: 2, threads: 1}\n", encoding="utf-8")
    assert load_params(tmp_path / "p.yaml").anchor.runner == RunnerSettings("dask", workers=2, threads=1)
    (tmp_path / "bad.yaml").write_text("anchor:\n  shards: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="shards"):
        load_params(tmp_path / "bad.yaml")


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


@pytest.mark.slow
def test_pilots_on_two_dask_workers_give_the_sequential_anchor(base, cluster, tmp_path, monkeypatch):
    import distributed

    loaded, ident = base
    runner = RunnerSettings("dask", address=cluster.scheduler_address, threads=1)
    ticks = []
    # The batches finish in the reverse of their order: the norms must still come in the pilots' order.
    monkeypatch.setattr(distributed, "as_completed", lambda futures: reversed(list(futures)))
    got = pilot_norms(loaded.model, loaded.tok, PILOTS, 0, VALUES, NAS, runner, ident,
                      progress=lambda d, t: ticks.append((d, t)))
    assert len(got.norms) == 7 and torch.equal(got.norms, _reference(loaded)) and got.threads == (1,)
    assert ticks == [(1, 7), (4, 7), (7, 7)]
    monkeypatch.undo()
    two = pilot_norms(loaded.model, loaded.tok, PILOTS, 0, VALUES, NAS,
                      RunnerSettings("dask", address=cluster.scheduler_address, threads=2), ident)
    assert two.threads == (2,) and torch.equal(two.norms, _reference(loaded, threads=2))
    s = MemitSettings(layers=(0,), values=VALUES, nas=NAS)
    here, _, _ = ensure_anchor(loaded.model, loaded.tok, "tiny", "memit", s, loaded.base_hash,
                               Paths(anchors=str(tmp_path / "here")).under(REPO), runner=RunnerSettings(threads=1))
    there, path, cached = ensure_anchor(loaded.model, loaded.tok, "tiny", "memit", s, loaded.base_hash,
                                        Paths(anchors=str(tmp_path / "dask")).under(REPO), runner=runner,
                                        ident=ident)
    assert not cached and there["reference_norm"] == here["reference_norm"]
    assert json.loads(path.read_text())["runner"] == {**runner.record(), "threads_used": [1]}
    assert here["runner"]["kind"] == "sequential" and here["runner"]["threads_used"] == [1]


@pytest.mark.slow
def test_a_worker_whose_base_was_edited_reloads_it_before_its_pilots(base, cluster):
    from distributed import Client

    loaded, ident = base
    runner = RunnerSettings("dask", address=cluster.scheduler_address, threads=1)

    def load_the_copy() -> str:
        from flows.engine.workers import unit_base

        return unit_base(ident).base_hash

    def edit_the_copy() -> int:
        from flows.engine import workers

        with torch.no_grad():
            for held in workers._BASES.values():
                held.model.model.layers[1].mlp.down_proj.weight.add_(0.5)  # a block above the pilots' layer
        return len(workers._BASES)

    with Client(cluster.scheduler_address) as client:
        assert set(client.run(load_the_copy).values()) == {ident.base_hash}  # every worker holds its copy
        assert list(client.run(edit_the_copy).values()) == [1, 1]
    got = pilot_norms(loaded.model, loaded.tok, PILOTS, 0, VALUES, NAS, runner, ident)
    assert torch.equal(got.norms, _reference(loaded))
