"""A study stops when it is interrupted, and a method folder is edited by one process at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.studies import stopping

REPO = Path(__file__).resolve().parents[3]


def test_a_method_folder_is_locked_while_a_unit_edits_it(tmp_path):
    folder = tmp_path / "study" / "memit"
    with stopping.method_lock(folder):
        with pytest.raises(stopping.StudyBusyError, match=rf"{os.getpid()}.*run the same command to resume"):
            with stopping.method_lock(folder):  # a second open file: another process would see the same
                pass
        with stopping.method_lock(tmp_path / "study" / "memit+nas"):  # another method is free
            pass
    with stopping.method_lock(folder):  # released at the end of the block
        pass


def test_the_lock_dies_with_its_holder(tmp_path):
    folder = tmp_path / "memit"
    code = ("import sys, time; from pathlib import Path; from flows.studies import stopping\n"
            "with stopping.method_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(stopping.StudyBusyError, match=str(holder.pid)):
            with stopping.method_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with stopping.method_lock(folder):  # the kernel dropped the killed holder's lock
        pass


def test_stop_flags_belong_to_one_run(tmp_path):
    mine, theirs = stopping.new_flag(tmp_path), stopping.new_flag(tmp_path)
    assert not stopping.flag_raised(mine) and not stopping.flag_raised(None)
    stopping.raise_flag(mine, "test")
    assert stopping.flag_raised(mine) and not stopping.flag_raised(theirs)
    assert json.loads(mine.read_text())["reason"] == "test"
    stopping.drop_flag(mine)
    stopping.drop_flag(theirs)  # never raised: nothing to remove, no error
    assert not stopping.flag_raised(mine)


def test_stopping_raises_the_flag_before_waiting_for_every_unit(tmp_path):
    flag = stopping.new_flag(tmp_path)
    waited = []

    class Future:
        def __init__(self):
            self.finished = False

        def done(self):
            return self.finished

    class Unit:
        def __init__(self, name):
            self.name, self.wrapped_future = name, Future()

        def wait(self, timeout):
            assert stopping.flag_raised(flag)  # the unit can only return once the flag is up
            waited.append(self.name)
            self.wrapped_future.finished = True

    class Log:
        def warning(self, *args):
            self.line = args[0] % args[1:]

    log = Log()
    stopping.stop_units({"memit": Unit("memit"), "memit+nas": Unit("memit+nas")}, flag, "interrupted", log)
    assert waited == ["memit", "memit+nas"]
    assert "same command resumes" in log.line


def test_a_unit_returns_before_its_next_batch_once_the_flag_is_up(tmp_path, monkeypatch):
    from flows.studies import horizon

    flag = stopping.new_flag(tmp_path)
    edited = []

    class Session:
        request_log: list = []

    def edited_batch(self, session, batch):
        edited.append(len(batch))
        if len(edited) == 2:
            stopping.raise_flag(flag, "test")

    monkeypatch.setattr(horizon, "_method_session", lambda *a, **k: (Session(), []))
    monkeypatch.setattr(horizon.StreamClock, "edited", edited_batch)
    point = {"metrics": {}, "seconds_per_edit": 1.0, "seconds_per_edit_all": 1.0, "collapsed": False}
    monkeypatch.setattr(horizon, "_measure", lambda session, stream, done, *a, **k: {**point, "edits": done})
    monkeypatch.setattr(horizon, "_save_points", lambda *a: None)

    class Base:
        model = tok = name = base_hash = None

    class Log:
        def info(self, *a):
            pass

        def warning(self, *a):
            self.line = a[0] % a[1:]

    log = Log()
    settings = horizon.HorizonSettings(methods=("memit",), stream_length=30, batch_size=3, eval_every=6)
    points = horizon._edit_stream("memit", Base(), None, settings, list(range(30)), {}, {}, None, tmp_path, log,
                                  stop=flag)
    assert edited == [3, 3]  # the third batch never started
    assert [p["edits"] for p in points] == [6]
    assert "stopped on request after 6 edits; its checkpoint holds 6" in log.line


@pytest.mark.slow
def test_sigterm_stops_a_running_study_and_the_same_command_resumes(prefect, tiny_folder, tmp_path, monkeypatch):
    """Python handles SIGTERM in the flow's main thread only; the unit in the runner's thread stops before its
    next batch instead of editing on, and the interrupt still ends the flow."""
    from prefect.exceptions import TerminationSignal
    from test_horizon_flow import easyedit_stream, study_params

    from flows.studies.horizon import HorizonSettings, horizon_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_params(tiny_folder, tmp_path)
    source = easyedit_stream(tmp_path / "stream.json", 300)
    settings = HorizonSettings(methods=("memit",), stream_length=300, batch_size=3, eval_every=3, general_items=1,
                               canary_tokens=64, retention_sample=4, stop_after_collapse=1000)

    def signal_after_first_point():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((tmp_path / "out").glob("*/memit/points.json")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # Prefect's handler turns it into TerminationSignal

    # Once the flow has handled it, Prefect hands the signal to the handler it found: here one that
    # records it, in a real process the default one, which ends the process.
    handed_on = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: handed_on.append(sig))
    sender = threading.Thread(target=signal_after_first_point, daemon=True)
    try:
        sender.start()
        with pytest.raises(TerminationSignal):
            horizon_study(str(tiny_folder / "tiny.yaml"), settings, source, tmp_path / "out",
                          f"sqlite:///{tmp_path}/m.db", tmp_path)
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handed_on == [signal.SIGTERM]
    (study,) = (tmp_path / "out").glob("*/memit")
    points = json.loads((study / "points.json").read_text())["points"]
    assert 1 <= len(points) < 100  # stopped long before the stream's end
    assert not list(study.parent.glob(f"{stopping.STOP_DIR}/*"))  # the run's flag went with it
    with stopping.method_lock(study):  # and so did the unit's lock
        pass


def test_a_study_labels_its_points_with_the_code_it_loaded(monkeypatch):
    from flows import io

    heads = iter(["aaa", "bbb"])
    monkeypatch.setattr(io, "code_version", lambda: next(heads))
    io.loaded_code_version.cache_clear()
    try:
        assert io.loaded_code_version() == "aaa"
        assert io.loaded_code_version() == "aaa"  # a commit made since does not relabel the run
    finally:
        io.loaded_code_version.cache_clear()
