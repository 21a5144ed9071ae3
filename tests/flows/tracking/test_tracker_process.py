"""The night's tracker in a child: same store, same results and errors as in-process, the
child's log records relayed, MLflow never imported by the caller."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nights import closed_port

from flows.tracking.store import TrackingError
from flows.tracking.tracker import Tracker
from flows.tracking.tracker_process import TrackerProcess, _picklable

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-child') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def child(store):
    with TrackerProcess(store, "child-exp") as tracker:
        yield tracker


def test_calls_land_in_the_same_store(child, store):
    run_id = child.start_batch_run("night-01", {"method": "alphaedit", "nas": {"enabled": True}})
    child.log_metrics(run_id, {"efficacy": 0.75}, step=3)
    child.tag_run(run_id, {"verdict": "promoted"})
    child.finish_run(run_id)
    here = Tracker(store, "child-exp")
    assert here.experiment_id == child.experiment_id
    run = here.client.get_run(run_id)
    assert run.data.metrics["efficacy"] == 0.75
    assert run.data.tags["verdict"] == "promoted"
    assert run.data.params["nas.enabled"] == "True"
    assert run.info.status == "FINISHED"


def test_results_come_back_as_values(child):
    assert child.version_for_label("nobody", "v0001") is None
    assert child.champion("nobody") is None
    assert child.unregistered_labels("nobody", ["v0001"]) == ["v0001"]


def test_errors_are_raised_here_with_their_type(child):
    run_id = child.start_batch_run("night-02", {})
    with pytest.raises(ValueError, match="run status must be one of"):
        child.finish_run(run_id, status="sideways")
    with pytest.raises(FileNotFoundError, match="no such file"):
        child.log_artifact(run_id, Path("/nonexistent/metrics.json"))
    child.finish_run(run_id)


def test_the_childs_log_records_are_relayed(child, caplog):
    run_id = child.start_batch_run("night-03", {})
    with caplog.at_level(logging.INFO, logger="flows.tracking"):
        child.log_metrics(run_id, {"perplexity": float("nan")})
    assert any(r.name == "flows.tracking.tracker" and "is nan" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    child.finish_run(run_id)


def test_only_trackers_methods_are_forwarded(child):
    with pytest.raises(AttributeError, match="no attribute 'client'"):
        child.client  # noqa: B018
    with pytest.raises(AttributeError):
        child._guard  # noqa: B018


def test_an_unreachable_store_fails_at_open_and_leaves_no_child():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        TrackerProcess(uri, "x")


def test_the_caller_never_imports_mlflow(store, tmp_path):
    code = (
        "import sys\n"
        "from flows.tracking.store import TrackingError\n"
        "from flows.tracking.tracker_process import TrackerProcess\n"
        f"with TrackerProcess({store!r}, 'fresh') as t:\n"
        "    run = t.start_batch_run('night-09', {'a': 1})\n"
        "    t.log_norm_plot(run, {'layer 3': [(0, 1.0), (8, 1.1)]}, sys.argv[1], 'norms', 'ratio')\n"
        "    t.finish_run(run)\n"
        "    try:\n"
        "        t.tag_run('0' * 32, {'verdict': 'x'})\n"
        "    except TrackingError as exc:\n"
        "        print('refused:', exc)\n"
        "print(sorted(m for m in ('mlflow', 'sqlalchemy', 'pandas', 'matplotlib') if m in sys.modules))\n"
    )
    png = tmp_path / "norms.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, str(png)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[]"
    assert lines[-2].startswith("refused: ") and "not found" in lines[-2]
    assert png.stat().st_size > 0


def test_only_python_and_project_errors_cross_as_themselves():
    class Foreign(Exception):
        __module__ = "mlflow.exceptions"

    class Rich(ValueError):
        def __init__(self, path: Path):
            super().__init__(path)

    assert isinstance(_picklable(KeyError("k")), KeyError)
    assert isinstance(_picklable(TrackingError("t")), TrackingError)
    for exc in (Foreign("no such run"), Rich(Path("x")), ValueError(object())):
        crossed = _picklable(exc)
        assert type(crossed) is TrackingError and type(exc).__name__ in str(crossed)
