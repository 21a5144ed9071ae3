"""Faults during a night: a SIGKILL mid-edit, a crash around the checkpoint write, MLflow down,
an unwritable or full checkpoint folder, two refreshes at once.

The invariant everywhere: the ledger is only ever appended by a finished promotion, so after
any fault it is byte-for-byte what it was, the champion it names is intact on disk, the batch
is not lost, and the next normal night carries on.

A real SIGKILL is sent once (to a subprocess that is editing). The on-disk states a kill inside
or right after ``write_checkpoint`` can leave are produced by raising at the exact point
(nothing in ``process_batch`` catches or cleans up, so a raise there leaves what a kill leaves)
or, for the temp folder that only a kill leaves behind, by planting it; timing a real SIGKILL
into a millisecond-long write would be flaky.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nights import closed_port, write_batch
from tiny import FACTS, fact

from flows.ledger.records import Ledger

REPO = Path(__file__).resolve().parents[3]

# The flow fixtures (fixtures only: importing test functions would collect them a second time).


def ledger_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "ledger.jsonl"
    return path.read_bytes() if path.exists() else b""


def version_folders(tmp_path: Path) -> list[str]:
    """Every entry of the checkpoints folder, hidden temp folders included."""
    folder = tmp_path / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def manifest(tmp_path: Path, version: str) -> dict:
    return json.loads((tmp_path / "checkpoints" / version / "manifest.json").read_text(encoding="utf-8"))


def first_night(night, tmp_path: Path) -> tuple[dict, bytes]:
    """Promote v0001 (one fact); returns its ledger entry and the ledger's bytes."""
    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    outcomes, params = night()
    assert [(o.outcome, o.version) for o in outcomes] == [("promoted", "v0001")]
    champ = Ledger(params.roots.ledger).champion()
    assert champ["version"] == "v0001" and manifest(tmp_path, "v0001")["weights_hash"] == champ["weights_hash"]
    return champ, ledger_bytes(tmp_path)


def second_batch(tmp_path: Path) -> tuple[Path, bytes]:
    path = write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*f) for f in FACTS[1:3]])
    return path, path.read_bytes()


def assert_nothing_happened(tmp_path: Path, before: bytes, batch: Path, data: bytes, versions: list[str]) -> None:
    assert ledger_bytes(tmp_path) == before, "the ledger changed"
    assert batch.read_bytes() == data, "the batch left the inbox or changed"
    assert not (tmp_path / "accepted" / batch.name).exists()
    assert not (tmp_path / "quarantine").exists()
    # A night killed while it edited may leave its batch's rollback spill (the next night removes it).
    assert [v for v in version_folders(tmp_path) if not v.startswith(".rollback-")] == versions


def assert_promoted_after(tmp_path: Path, outcomes: list[dict], version: str, parent: str | None,
                          batch: Path) -> None:
    assert [(o.outcome, o.version) for o in outcomes] == [("promoted", version)]
    ledger = Ledger(tmp_path / "ledger.jsonl")
    champ = ledger.champion()
    assert champ["version"] == version and champ["parent"] == parent
    assert manifest(tmp_path, version)["weights_hash"] == champ["weights_hash"] == outcomes[0].weights_hash
    assert not batch.exists() and (tmp_path / "accepted" / batch.name).is_file()


# --- SIGKILL while editing ------------------------------------------------------------------------

# The child runs the real flow against the session's Prefect test server. Its only change: the
# first sub-batch edit, once applied to the in-memory weights, hangs, so the kill lands mid-edit.
CHILD = """
import sys, time
import flows.engine.editing as editing

real_apply = editing.EditSession.apply

def apply_then_hang(self, requests):
    print("TEST-HOOK editing", flush=True)
    result = real_apply(self, requests)
    print("TEST-HOOK edit applied in memory", flush=True)
    time.sleep(3600)
    return result

editing.EditSession.apply = apply_then_hang
from flows.refresh.flow import nightly_refresh
nightly_refresh(sys.argv[1])
print("TEST-HOOK night finished (should not happen)", flush=True)
"""


def wait_for(log: Path, marker: str, child: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = log.read_text(encoding="utf-8", errors="replace")
        if marker in text:
            return time.monotonic() - t0
        if child.poll() is not None:
            pytest.fail(f"child exited ({child.returncode}) before {marker!r}:\n{text[-4000:]}")
        time.sleep(0.25)
    pytest.fail(f"no {marker!r} within {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.slow
def test_sigkill_mid_edit_loses_nothing_and_the_next_night_promotes(night, tmp_path, tracking_uri):
    from prefect.settings import PREFECT_API_URL

    champ, before = first_night(night, tmp_path)
    batch, data = second_batch(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "child.log"
    child_started_ms = int(time.time() * 1000)
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "params.yaml")], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        waited = wait_for(log, "TEST-HOOK edit applied in memory", child, timeout=480)
        os.killpg(child.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    print(f"child reached the edit after {waited:.1f} s and was SIGKILLed there")
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "valid requests; editing v0001" in text and "promoted" not in text

    assert_nothing_happened(tmp_path, before, batch, data, ["v0001"])
    assert manifest(tmp_path, "v0001")["weights_hash"] == champ["weights_hash"]
    # The kernel released the dead child's flock: the next night runs, rebuilds v0001 (load_champion
    # checks its weights hash against the ledger) and promotes the batch.
    outcomes, _ = night()
    assert_promoted_after(tmp_path, outcomes, "v0002", "v0001", batch)
    assert Ledger(tmp_path / "ledger.jsonl").champion()["edits_so_far"] == 3
    assert version_folders(tmp_path) == ["v0001", "v0002"]  # the killed night's rollback spill is gone
    # The killed night's MLflow run was left RUNNING; the next night closed it as KILLED.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    killed = client.search_runs(exps, filter_string=f"tags.batch_id = '{batch.stem}' and "
                                                    f"attributes.start_time >= {child_started_ms}")
    assert sorted((r.info.status, "orphaned" in r.data.tags) for r in killed) == [("FINISHED", False),
                                                                                  ("KILLED", True)]
    assert not client.search_runs(exps, filter_string="attributes.status = 'RUNNING'")


# --- crashes around write_checkpoint --------------------------------------------------------------

class SimulatedCrash(Exception):
    """Raised where a SIGKILL would have stopped the process."""


def test_crash_after_the_checkpoint_rename_and_a_killed_temp_folder_are_survived(night, tmp_path, monkeypatch):
    from flows.tracking.tracker_process import TrackerProcess

    champ, before = first_night(night, tmp_path)
    batch, data = second_batch(tmp_path)

    def crash(*args, **kwargs):
        raise SimulatedCrash("killed after write_checkpoint renamed v0002 into place, before the ledger append")

    with monkeypatch.context() as m:
        m.setattr(TrackerProcess, "register_checkpoint", crash, raising=False)  # the night's side of the MLflow child
        with pytest.raises(SimulatedCrash):
            night()
    # An orphan: a complete v0002 folder the ledger never heard of; the batch is still in the inbox.
    assert_nothing_happened(tmp_path, before, batch, data, ["v0001", "v0002"])
    orphan = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "v0002").iterdir()}
    # A SIGKILL *inside* write_checkpoint leaves its temp folder (its cleanup never runs): plant one
    # half-written, with the name the next write would use.
    killed = tmp_path / "checkpoints" / ".v0003.tmp-killed"
    killed.mkdir()
    (killed / "increment.safetensors").write_bytes((tmp_path / "checkpoints" / "v0001" / "increment.safetensors")
                                                .read_bytes()[:100])
    # ... and a night killed while it edited leaves its batch's rollback spill.
    spill = tmp_path / "checkpoints" / ".rollback-killed"
    spill.mkdir()
    (spill / "inverses.safetensors").write_bytes(b"half")

    outcomes, _ = night()
    # next_version skips the orphan, the temp folder is never read, and the ledger names only
    # checkpoints it promoted.
    assert_promoted_after(tmp_path, outcomes, "v0003", "v0001", batch)
    assert [e["version"] for e in Ledger(tmp_path / "ledger.jsonl").promotions()] == ["v0001", "v0003"]
    assert manifest(tmp_path, "v0001")["weights_hash"] == champ["weights_hash"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "v0002").iterdir()} == orphan
    # The next night removed the killed write's temp folder and the spill; the orphan stays
    # (reported, never reused).
    assert version_folders(tmp_path) == ["v0001", "v0002", "v0003"] and not spill.exists()


CRASH_POINTS = [
    # The ledger is appended before the batch is moved: a crash in between leaves the batch in the
    # inbox, and the next night recognises its hash and finishes the move (moving first lost it).
    pytest.param("after_moving_the_batch"),
    pytest.param("after_the_ledger_append"),
]


@pytest.mark.parametrize("crash_point", CRASH_POINTS)
def test_a_crash_at_the_end_of_a_promotion_never_loses_the_batch(night, tmp_path, monkeypatch, crash_point):
    batch = write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    real_append = Ledger.append

    def crash_after_the_move(real):  # wraps os.replace / os.rename, whatever puts the batch in accepted/
        def move(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            if Path(dst).parent.name == "accepted" and not Path(dst).name.startswith("."):
                raise SimulatedCrash("killed right after the batch's bytes arrived in accepted/")
            return result
        return move

    def append_then_crash(self, event, **fields):
        entry = real_append(self, event, **fields)
        if event == "promote":
            raise SimulatedCrash("killed right after the ledger append")
        return entry

    with monkeypatch.context() as m:
        if crash_point == "after_moving_the_batch":
            m.setattr(os, "replace", crash_after_the_move(os.replace))
            m.setattr(os, "rename", crash_after_the_move(os.rename))
        else:
            m.setattr(Ledger, "append", append_then_crash)
        with pytest.raises(SimulatedCrash):
            night()
    outcomes, _ = night()  # the re-run finishes the promotion (or finds it finished)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    assert [e["batch_id"] for e in ledger.promotions()] == ["night-01"], (
        f"batch lost: ledger {[e['event'] for e in ledger.entries()]}, outcomes {outcomes}, "
        f"inbox {sorted(p.name for p in batch.parent.iterdir())}")
    assert ledger.champion()["version"] == "v0001"
    assert not batch.exists() and sorted(p.name for p in (tmp_path / "accepted").iterdir()) == [batch.name]


# --- MLflow unreachable ---------------------------------------------------------------------------

def test_unreachable_mlflow_fails_the_night_loudly_without_promoting(night, tmp_path, monkeypatch):
    import flows.refresh.operations as operations
    from flows.tracking.store import TrackingError

    uri = f"http://127.0.0.1:{closed_port()}"
    batch = write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    data = batch.read_bytes()
    attempts = []

    class CountingTracker(operations.TrackerProcess):
        def __init__(self, *args, **kwargs):
            attempts.append(time.monotonic())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(operations, "TrackerProcess", CountingTracker)  # open_tracker, which connect_tracking retries
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri}.* is unreachable"):
        night(tracking={"uri": uri})
    seconds = time.monotonic() - t0
    print(f"unreachable MLflow: {len(attempts)} attempts, night failed after {seconds:.1f} s")
    assert len(attempts) == 4  # connect_tracking: 1 try + 3 retries
    assert seconds < 60
    assert_nothing_happened(tmp_path, b"", batch, data, [])
    assert not (tmp_path / "reports").exists()  # it failed before touching any batch


# --- unwritable / full checkpoint folder ----------------------------------------------------------

def test_checkpoint_folder_under_a_regular_file_fails_the_night_cleanly(night, tmp_path):
    # As root no chmod makes a folder unwritable; a path *under a regular file* fails for everyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    batch = write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    data = batch.read_bytes()
    with pytest.raises(OSError) as err:
        night(paths={"checkpoints": str(blocker / "checkpoints")})
    print(f"checkpoint folder under a file: the night fails with {type(err.value).__name__}: {err.value}")
    assert str(blocker) in str(err.value)
    # The batch stays in the inbox (not quarantined: it is not the batch's fault) and nothing is recorded.
    assert_nothing_happened(tmp_path, b"", batch, data, [])
    assert blocker.read_text(encoding="utf-8") == "a file, not a folder"


def test_disk_full_while_writing_a_checkpoint_keeps_the_champion(night, tmp_path, monkeypatch):
    import flows.engine.checkpoints as checkpoints

    champ, before = first_night(night, tmp_path)
    batch, data = second_batch(tmp_path)
    real_save = checkpoints.save_file
    failed = []

    def save_until_full(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name.startswith(".v0002.tmp-") and Path(filename).name == "increment.safetensors":
            Path(filename).write_bytes(b"\0" * 64)  # half written, then the disk is full
            failed.append(filename)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_file", save_until_full)
        with pytest.raises(OSError, match="No space left on device"):
            night()
    assert failed
    # write_checkpoint removed its temp folder; no v0002; ledger, batch and champion untouched.
    assert_nothing_happened(tmp_path, before, batch, data, ["v0001"])
    assert manifest(tmp_path, "v0001")["weights_hash"] == champ["weights_hash"]
    assert Ledger(tmp_path / "ledger.jsonl").champion() == champ


# --- two refreshes at once ------------------------------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"pid {os.getpid()} (test holder)".encode())
print("locked", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_refresh_in_another_process_blocks_this_one(night, tmp_path):
    from flows.refresh.lock import RefreshLocked

    batch = write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    data = batch.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".refresh.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RefreshLocked, match=rf"held by pid {holder.pid} \(test holder\)"):
            night()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert_nothing_happened(tmp_path, b"", batch, data, [])
