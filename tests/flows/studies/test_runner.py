"""Studies on Dask: the runner's settings, the per-process base model, and the same results from a
two-worker LocalCluster as from the sequential run (tiny model in-process)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from test_horizon_flow import REPO, easyedit_stream

from flows.config.runner import RunnerSettings
from flows.engine.workers import BaseIdent, unit_base, unit_threads
from flows.studies.runner import run_study, task_runner


def test_runner_settings_refuse_what_does_not_go_together():
    assert RunnerSettings().record() == {"kind": "sequential", "address": None, "workers": None, "threads": None}
    for bad, match in (({"kind": "ray"}, "sequential, dask"), ({"workers": 2}, "need the dask runner"),
                       ({"kind": "dask", "address": "tcp://h:8786", "workers": 2}, "mutually exclusive"),
                       ({"kind": "dask", "workers": 0}, ">= 1"), ({"threads": 0}, ">= 1")):
        with pytest.raises(ValueError, match=match):
            RunnerSettings(**bad)


@pytest.mark.parametrize("command", [["bench", "horizon"], ["bench", "layer-sweep"]])
@pytest.mark.parametrize(("flags", "says"), [
    (["--workers", "2"], "need the dask runner"), (["--runner", "ray"], "sequential, dask"),
    (["--runner", "dask", "--address", "tcp://h:8786", "--workers", "2"], "mutually exclusive"),
    (["--threads", "0"], ">= 1")])
def test_runner_flags_are_usage_errors_before_any_flow(command, flags, says):
    from typer.testing import CliRunner

    from flows.cli.app import app

    result = CliRunner().invoke(app, [*command, *flags])
    assert result.exit_code == 2 and says in " ".join(result.output.split())


def test_task_runners_by_kind():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    seq = task_runner(RunnerSettings())
    assert isinstance(seq, ThreadPoolTaskRunner) and seq._max_workers == 1
    local = task_runner(RunnerSettings("dask", workers=3))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}
    assert task_runner(RunnerSettings("dask", address="tcp://h:8786")).address == "tcp://h:8786"


def test_a_process_loads_its_base_once_and_reloads_an_edited_one(monkeypatch, tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    from flows.engine import workers as runner
    from flows.engine.base import BaseModel
    from nas_core.deltas import weights_hash

    loads = []

    def fetch(source, models_root, device, dtype):
        loads.append(source)
        m = tiny_model()
        return BaseModel(m, tiny_tokenizer(), "tiny", tmp_path, weights_hash(m))

    monkeypatch.setattr(runner, "fetch_base", fetch)
    monkeypatch.setattr(runner, "_BASES", {})
    ident = BaseIdent("tiny", tmp_path, "cpu", "float32", weights_hash(tiny_model()))
    log = logging.getLogger("test")
    first = unit_base(ident, log)
    assert unit_base(ident, log) is first and loads == ["tiny"]
    with torch.no_grad():
        next(first.model.parameters()).add_(1.0)  # a unit that failed half-way
    assert unit_base(ident, log) is not first and loads == ["tiny", "tiny"]
    with pytest.raises(RuntimeError, match="weights hash"):
        unit_base(BaseIdent("tiny", tmp_path, "cpu", "float32", "0" * 64), log)


def test_unit_threads_sets_and_restores_torchs_count():
    before = torch.get_num_threads()
    with unit_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with unit_threads(None) as n:
        assert n == before


#: Two CounterFact cases in the ROME layout (the layer sweep's source).
ROME_CASES = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": subj, "target_new": {"str": new},
                                                   "target_true": {"str": true}, "relation_id": "P0"},
               "paraphrase_prompts": [f"Here is a fact. {p.format(subj)}"],
               "neighborhood_prompts": ["The capital of France is"]}
              for i, (p, subj, new, true) in enumerate([("The capital of {} is", "France", "Rome", "Paris"),
                                                        ("{} speaks", "Danielle Darrieux", "English", "French")])]


def _params(tiny_folder: Path, work: Path) -> None:
    cache = tiny_folder / "cache"
    (work / "params.yaml").write_text(yaml.safe_dump({"paths": {
        "models": str(cache / "models"), "stats": str(cache / "stats"), "anchors": str(cache / "anchors"),
        "eval_cache": str(work / "eval"), "demo": str(REPO / "data" / "demo"),
        "shared_data": str(work / "no-shared-data")}}), encoding="utf-8")


def _checkpoints(res: dict) -> dict[str, dict]:
    out = Path(res["results_path"]).parent
    docs = {m: json.loads((out / m / "checkpoint" / "manifest.json").read_text()) for m in res["methods"]}
    return {m: {"weights_hash": d["weights_hash"], "files": d["files"]} for m, d in docs.items()}


@pytest.mark.slow
def test_the_dask_horizon_with_sharded_retention_computes_what_the_sequential_one_does(prefect, tiny_folder, tmp_path,
                                                                                     monkeypatch):
    from flows.studies.horizon import HorizonSettings, horizon_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params(tiny_folder, tmp_path)
    source = easyedit_stream(tmp_path / "stream.json", 6)
    settings = HorizonSettings(methods=("memit", "memit+nas", "rome", "alphaedit+nas"), stream_length=6,
                               batch_size=3, eval_every=3, general_items=1, canary_tokens=64, pilots=4,
                               retention_sample=4, stop_after_collapse=100)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    # The Dask run also scores each point's retention in three shards on the same cluster.
    for kind, runner, shards in (("sequential", RunnerSettings(threads=1), 1),
                                 ("dask", RunnerSettings("dask", workers=2, threads=1), 3)):
        runs[kind] = run_study(horizon_study, runner, str(tiny_folder / "tiny.yaml"), settings, source,
                               tmp_path / kind, uri, tmp_path, retention_shards=shards)
    seq, dask = runs["sequential"], runs["dask"]
    assert dask["runner"] == {"kind": "dask", "address": None, "workers": 2, "threads": 1, "retention_shards": 3}
    assert _checkpoints(seq) == _checkpoints(dask)
    for m in settings.methods:
        assert [p["edits"] for p in seq["methods"][m]["points"]] == [3, 6]
        metrics = [[p["metrics"] for p in r["methods"][m]["points"]] for r in (seq, dask)]
        assert metrics[0] == metrics[1]
        assert {p["threads"] for p in dask["methods"][m]["points"]} == {1}
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert _processes(seq) == {here}
    assert here not in _processes(dask) and len(_processes(dask)) <= 2  # two workers, each its own model


def _processes(res: dict) -> set[str]:
    return {p["process"] for r in res["methods"].values() for p in r["points"]}


@pytest.mark.slow
def test_the_dask_layer_sweep_matches_the_sequential_one(prefect, tiny_folder, tmp_path):
    from distributed import LocalCluster

    from flows.studies.sweep import layer_sweep_study

    _params(tiny_folder, tmp_path)
    (tmp_path / "no-shared-data" / "counterfact").mkdir(parents=True)
    (tmp_path / "no-shared-data" / "counterfact" / "counterfact_500.json").write_text(json.dumps(ROME_CASES))
    rows = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        for kind, runner in (("sequential", RunnerSettings(threads=1)),
                             ("dask", RunnerSettings("dask", address=cluster.scheduler_address, threads=1))):
            rows[kind] = run_study(layer_sweep_study, runner, str(tiny_folder / "tiny.yaml"), [0, 1], 2,
                                   project=tmp_path)
    assert [r.layer for r in rows["dask"]] == [0, 1]
    for seq, dask in zip(rows["sequential"], rows["dask"], strict=True):
        assert (seq.efficacy, seq.paraphrase, seq.neighbourhood_kept_pct) == (
            dask.efficacy, dask.paraphrase, dask.neighbourhood_kept_pct)
        assert {k: v for k, v in seq.record.items() if k != "seconds"} == {
            k: v for k, v in dask.record.items() if k != "seconds"}


def test_dask_workers_are_told_the_drivers_temporary_prefect_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.refresh import prefect_runtime
    from flows.studies.runner import _workers_report_here

    url = "http://127.0.0.1:4321/api"
    started, stopped = [], []
    monkeypatch.setattr(prefect_runtime, "_start_server", lambda env, timeout: (started.append(url) or "srv", url))
    monkeypatch.setattr(prefect_runtime, "_stop_child", stopped.append)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API: Prefect would start a temporary server
        with _workers_report_here(RunnerSettings()):
            assert PREFECT_API_URL.value() is None and not started  # sequential: Prefect's own way
        with _workers_report_here(RunnerSettings("dask", workers=2)):
            assert PREFECT_API_URL.value() == url and started == [url] and not stopped
        assert PREFECT_API_URL.value() is None and stopped == ["srv"]
