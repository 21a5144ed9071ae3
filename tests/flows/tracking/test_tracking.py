"""flows.tracking against a real SQLite MLflow store in a temp folder (MLflow itself is not mocked)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from nights import closed_port
from safetensors.torch import save_file

from flows.tracking import names as tracking
from flows.tracking.names import (
    DEFAULT_EXPERIMENT,
    TRUNCATION_MARKER,
    flatten_params,
    registered_model_name,
    sanitize_key,
)
from flows.tracking.plots import norm_plot
from flows.tracking.store import TrackingError, check_tracking_store
from flows.tracking.tracker import Tracker
from flows.tracking.uris import default_tracking_uri, resolve_tracking_uri

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture(scope="module")
def tracker(store) -> Tracker:
    # One database per module: creating MLflow's schema costs seconds.
    return Tracker(default_tracking_uri(store))


def fake_checkpoint(folder: Path, model: str = "smollm2-135m", edits: int = 1) -> Path:
    """A folder shaped like flows.engine.write_checkpoint output (safetensors + manifest.json)."""
    folder.mkdir(parents=True)
    save_file({"model.layers.3.mlp.down_proj.weight": torch.full((2, 2), float(edits))}, folder / "deltas.safetensors")
    save_file({"edit_count": torch.tensor([edits])}, folder / "state.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"format": "nas-checkpoint/1", "model": model}), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- pure helpers


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None, tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db" == default_tracking_uri(tmp_path)
    assert default.startswith("sqlite:////")  # absolute path: four slashes
    assert resolve_tracking_uri("", tmp_path) == default
    assert resolve_tracking_uri("http://mlflow.internal:5000", tmp_path) == "http://mlflow.internal:5000"
    # A relative sqlite path in params.yaml means relative to the repo, not to the cwd.
    assert resolve_tracking_uri("sqlite:///data/t.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/data/t.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert resolve_tracking_uri("http://mlflow.internal:5000", tmp_path) == "sqlite:////elsewhere/x.db"


def test_registered_model_name():
    assert registered_model_name("smollm2-135m") == "nas-smollm2-135m"
    assert registered_model_name("HuggingFaceTB/SmolLM2-135M") == "nas-HuggingFaceTB-SmolLM2-135M"
    assert registered_model_name("a:b c") == "nas-a-b-c"
    assert registered_model_name("nas-smollm2-135m") == "nas-smollm2-135m"
    with pytest.raises(ValueError):
        registered_model_name("//")


@pytest.mark.parametrize(
    "key",
    ["acc/top-1", "layer 3 norm", "a//b", "/lead", "trail/", "./x", "../up", "..dots", "é:ß?", "", "x" * 300],
)
def test_sanitize_key_satisfies_mlflow(key):
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    clean = sanitize_key(key)
    assert clean and len(clean) <= 250
    assert all(c.isascii() and (c.isalnum() or c in "_-. /") for c in clean)
    assert validate_param_and_metric_name(clean)
    assert not path_not_unique(clean)


def test_sanitize_key_keeps_valid_keys():
    for key in ("efficacy", "norm/layer 3", "nas.anchor-scale_x"):
        assert sanitize_key(key) == key


def test_limits_mirror_mlflow():
    from mlflow.utils import validation

    for name in (
        "MAX_PARAM_VAL_LENGTH",
        "MAX_TAG_VAL_LENGTH",
        "MAX_ENTITY_KEY_LENGTH",
        "MAX_PARAMS_TAGS_PER_BATCH",
        "MAX_METRICS_PER_BATCH",
    ):
        assert getattr(tracking, name) == getattr(validation, name), name


def test_flatten_params():
    flat = flatten_params({"nas": {"enabled": True, "scale": 0.5, "layers": [3, 4]}, "method": "memit", "empty": {}})
    assert flat == {
        "nas.enabled": "True",
        "nas.scale": "0.5",
        "nas.layers": "[3, 4]",
        "method": "memit",
        "empty": "{}",
    }


# --------------------------------------------------------------------------- runs


def test_batch_run_records_params_and_metrics(tracker, store):
    run_id = tracker.start_batch_run(
        "2026-01-02",
        {"nas": {"enabled": True, "layers": [3, 4]}, "notes": "x" * 7000},
        tags={"trigger": "nightly"},
    )
    tracker.log_metrics(run_id, {"efficacy": 0.9, "norm ratio!": 1.5, "collapsed": float("nan")}, step=7)
    tracker.log_metrics(run_id, {"blowup": float("inf")})

    client = tracker.client
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == DEFAULT_EXPERIMENT
    assert exp.artifact_location == (store / "mlartifacts").resolve().as_uri()
    assert run.info.run_name == "2026-01-02"
    assert run.data.tags["batch_id"] == "2026-01-02" and run.data.tags["trigger"] == "nightly"
    assert run.data.params["nas.enabled"] == "True"
    assert run.data.params["nas.layers"] == "[3, 4]"
    notes = run.data.params["notes"]
    assert len(notes) == tracking.MAX_PARAM_VAL_LENGTH and notes.endswith(TRUNCATION_MARKER)
    assert run.data.metrics["efficacy"] == pytest.approx(0.9)
    assert run.data.metrics["norm ratio_"] == pytest.approx(1.5)
    assert math.isnan(run.data.metrics["collapsed"])
    # SQL stores cannot hold inf; MLflow stores the largest double instead.
    assert run.data.metrics["blowup"] >= 1e308
    assert [m.step for m in client.get_metric_history(run_id, "efficacy")] == [7]
    assert [m.step for m in client.get_metric_history(run_id, "blowup")] == [0]


def test_log_series_keeps_steps(tracker):
    run_id = tracker.start_batch_run("series", {})
    tracker.log_series(run_id, "norm/layer 3", [(0, 1.0), (10, 1.25), (20, 1.5)])
    history = tracker.client.get_metric_history(run_id, "norm/layer 3")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (10, 1.25), (20, 1.5)]


def test_artifacts_land(tracker, tmp_path):
    run_id = tracker.start_batch_run("artifacts", {})
    report = tmp_path / "report.md"
    report.write_text("# nightly\n", encoding="utf-8")
    tracker.log_artifact(run_id, report, "reports")
    tracker.log_dict(run_id, {"path": tmp_path, "score": 0.5}, "eval/summary.json")

    assert tracker.list_artifacts(run_id) == ["eval", "reports"]
    assert tracker.list_artifacts(run_id, "reports") == ["reports/report.md"]
    from mlflow.artifacts import load_dict

    artifact_uri = tracker.client.get_run(run_id).info.artifact_uri
    assert load_dict(f"{artifact_uri}/eval/summary.json") == {"path": str(tmp_path), "score": 0.5}
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(run_id, tmp_path / "missing.txt")


def test_mark_rejected_and_finish(tracker):
    run_id = tracker.start_batch_run("rejected", {})
    tracker.mark_rejected(run_id, ["efficacy", "norm_growth"])
    tracker.finish_run(run_id, "FAILED")
    run = tracker.client.get_run(run_id)
    assert run.data.tags["verdict"] == "rejected"
    assert run.data.tags["failed_checks"] == "efficacy,norm_growth"
    assert run.data.tags["failed.efficacy"] == "true" and run.data.tags["failed.norm_growth"] == "true"
    assert run.info.status == "FAILED"
    with pytest.raises(ValueError):
        tracker.finish_run(run_id, "DONE")


def test_close_orphaned_runs_kills_only_running_runs(tracker):
    from flows.tracking.tracker import Tracker

    # Its own experiment: other tests of the shared store leave runs open on purpose.
    tracker = Tracker(tracker.tracking_uri, experiment="orphan-test")
    done = tracker.start_batch_run("done", {})
    tracker.finish_run(done)
    left = tracker.start_batch_run("left-running", {})
    assert tracker.close_orphaned_runs("test: the night died") == [left]
    run = tracker.client.get_run(left)
    assert run.info.status == "KILLED" and run.data.tags["orphaned"] == "test: the night died"
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert tracker.close_orphaned_runs("again") == []


def test_refused_write_raises_tracking_error(tracker):
    with pytest.raises(TrackingError, match="sqlite:///"):
        tracker.log_metrics("0" * 32, {"efficacy": 1.0})


# --------------------------------------------------------------------------- registry


def test_register_checkpoints_and_move_champion(tracker, tmp_path):
    name = registered_model_name("smollm2-135m")
    assert tracker.champion(name) is None  # no registered model yet
    run1 = tracker.start_batch_run("night-1", {})
    run2 = tracker.start_batch_run("night-2", {})
    ck1 = fake_checkpoint(tmp_path / "v0001", edits=1)
    ck2 = fake_checkpoint(tmp_path / "v0002", edits=2)

    v1 = tracker.register_checkpoint(name, run1, ck1, "v0001", tags={"edit_count": "1"})
    assert v1 == "1"
    assert tracker.champion(name) is None  # registered, but nobody holds the alias yet
    tracker.set_champion(name, v1)
    assert tracker.champion(name).version_label == "v0001"

    v2 = tracker.register_checkpoint(name, run2, ck2, "v0002")
    assert v2 == "2"
    assert tracker.register_checkpoint(name, run2, ck2, "v0002") == "2"  # retry: no duplicate version
    tracker.set_champion(name, v2)
    champ = tracker.champion(name)
    assert (champ.version, champ.version_label, champ.run_id) == ("2", "v0002", run2)
    assert tracker.version_for_label(name, "v0001") == "1"
    assert tracker.version_for_label(name, "v0002") == "2"
    assert tracker.version_for_label(name, "v0099") is None

    client = tracker.client
    model = client.get_registered_model(name)
    assert model.description == "smollm2-135m + cumulative NAS edit deltas"
    mv1 = client.get_model_version(name, "1")
    assert mv1.tags == {"version_label": "v0001", "edit_count": "1"}
    assert mv1.run_id == run1 and "champion" not in mv1.aliases
    assert tracker.list_artifacts(run1, "checkpoint") == [
        "checkpoint/deltas.safetensors",
        "checkpoint/manifest.json",
        "checkpoint/state.safetensors",
    ]
    # The version's source is the run's checkpoint folder; the files there are the safetensors we wrote.
    from mlflow.utils.file_utils import local_file_uri_to_path
    from safetensors.torch import load_file

    source = Path(local_file_uri_to_path(client.get_model_version(name, "2").source))
    assert torch.equal(
        load_file(source / "deltas.safetensors")["model.layers.3.mlp.down_proj.weight"], torch.full((2, 2), 2.0)
    )
    assert client.get_run(run2).data.tags["model_version"] == "2"


def test_register_rejects_missing_checkpoint(tracker, tmp_path):
    run_id = tracker.start_batch_run("no-checkpoint", {})
    with pytest.raises(FileNotFoundError):
        tracker.register_checkpoint("nas-missing", run_id, tmp_path / "nope", "v0001")
    assert tracker.version_for_label("nas-missing", "v0001") is None


def test_second_tracker_reuses_experiment(tracker, store):
    again = Tracker(default_tracking_uri(store))
    assert again.experiment_id == tracker.experiment_id


# --------------------------------------------------------------------------- health


def test_healthcheck_passes_on_a_working_store(tracker):
    tracker.healthcheck()  # must not raise


def test_unreachable_http_store_fails_fast():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri):
        Tracker(uri)
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking_store(uri)
    assert time.monotonic() - start < 15


def test_sqlite_in_unusable_folder_raises(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    # A regular file as the parent is unwritable even for root (chmod would not be).
    uri = f"sqlite:///{blocker}/mlflow.db"
    with pytest.raises(TrackingError, match=uri):
        Tracker(uri)
    missing = tmp_path / "missing" / "deeper"
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_store(f"sqlite:///{missing}/mlflow.db")
    assert not missing.exists()  # no fresh, empty store silently created under a typo


# --------------------------------------------------------------------------- plots


def test_norm_plot_writes_png(tmp_path):
    out = tmp_path / "plots" / "norms.png"
    history = {"layer 3": [(0, 1.0), (10, 1.2), (20, float("inf"))], "layer 4": [(0, 1.0), (10, 1.1)]}
    assert norm_plot(history, out, "Weight norms", "||W||_F") == out
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["norms.png"]  # no temp file left behind
    empty = norm_plot({}, tmp_path / "empty.png", "nothing", "norm")
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
