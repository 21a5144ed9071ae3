"""The horizon study end to end on the tiny model: points, phases, the resume after a stop, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import FACTS

REPO = Path(__file__).resolve().parents[3]


def easyedit_stream(path: Path, n: int) -> Path:
    """``n`` requests in CounterFact's EasyEdit layout (the study's source format), cycling FACTS."""
    records = []
    for i in range(n):
        key, prompt, subject, new, true = FACTS[i % len(FACTS)]
        records.append({"case_id": i, "prompt": prompt.format(subject), "subject": subject, "target_new": new,
                        "ground_truth": true, "rephrase_prompt": f"Here is a fact. {prompt.format(subject)}",
                        "locality_prompt": "The capital of France is", "locality_ground_truth": "Paris"})
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def study_params(tiny_folder: Path, project: Path, **extra) -> Path:
    """``project``/params.yaml for a study of the tiny model: the tiny folder's caches, no shared data."""
    cache = tiny_folder / "cache"
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"paths": {
        "models": str(cache / "models"), "stats": str(cache / "stats"), "anchors": str(cache / "anchors"),
        "eval_cache": str(project / "eval"), "demo": str(REPO / "data" / "demo"),
        "shared_data": str(project / "no-shared-data"), **extra.pop("paths", {})}, **extra}), encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_study_measures_resumes_and_logs(prefect, tiny_folder, tmp_path, monkeypatch):
    from flows.studies.horizon import HorizonSettings, horizon_study
    from flows.tracking.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The +nas method's anchor is calibrated afresh, its pilots on params.yaml's dask anchor runner.
    study_params(tiny_folder, tmp_path, paths={"anchors": str(tmp_path / "anchors")},
                 anchor={"runner": {"kind": "dask", "workers": 2, "threads": 1}})
    source = easyedit_stream(tmp_path / "stream.json", 12)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def study(stop_after_collapse: int) -> dict:
        # The tiny model's editing score is below 60 from the first point: its CP@60 is 3 edits.
        settings = HorizonSettings(methods=("memit", "memit+nas"), stream_length=12, batch_size=3, eval_every=3,
                                   general_items=1, canary_tokens=64, pilots=4, retention_sample=4,
                                   stop_after_collapse=stop_after_collapse)
        return horizon_study(str(tiny_folder / "tiny.yaml"), settings, source, tmp_path / "out", uri, tmp_path)

    first = study(1)  # stops one point past CP@60
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "anchors").rglob("anchor-*.json")]
    assert record["runner"]["kind"] == "dask" and record["runner"]["threads_used"] == [1]
    for label in ("memit", "memit+nas"):
        points = first["methods"][label]["points"]
        assert [p["edits"] for p in points] == [3, 6]
        last = points[-1]
        assert set(last["phase_seconds"]) >= {"values", "keys", "solve", "write"}
        assert last["seconds_per_edit_all"] >= last["seconds_per_edit"] > 0
        assert last["edit_seconds"] >= points[0]["edit_seconds"]
        assert len(last["retention_sample"]["indices"]) <= 4 + 3
    # The same study again, stopping later (not part of the study's key): each method resumes
    # from its checkpoint after 6 edits.
    second = study(100)
    for label in ("memit", "memit+nas"):
        points = second["methods"][label]["points"]
        assert [p["edits"] for p in points] == [3, 6, 9, 12]
        kept = [(p["edits"], p["measured_at"], p["edit_seconds"]) for p in points[:2]]
        assert kept == [(p["edits"], p["measured_at"], p["edit_seconds"]) for p in first["methods"][label]["points"]]
        assert points[2]["edit_seconds"] > points[1]["edit_seconds"]  # the clock carried over
    assert Path(second["plot_path"]).is_file()
    assert json.loads(Path(second["results_path"]).read_text())["methods"].keys() == {"memit", "memit+nas"}
    tracker = Tracker(uri, "horizon-study")
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert {r.data.params["method"] for r in runs} == {"memit", "memit+nas"}
