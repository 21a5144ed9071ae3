"""A killed night's temporary Prefect server is stopped by the next night (flows/prefect_runtime.py).

The first test reproduces the defect for real: a subprocess claims a night the way ``nas refresh``
does, runs a trivial flow (so Prefect starts its temporary API server) and is SIGKILLed; the
server outlives it. Then the next night's reaper runs and the server must be gone. The others use
stand-ins (``python -c sleep`` with a Prefect-server command line) to check, in a second each,
what the reaper must never touch: a live night's server, a reused pid, a non-server child, a
server whose starter still runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.refresh import prefect_runtime
from flows.refresh.prefect_runtime import TOKEN_ENV, reap_orphans, records_dir

REPO = Path(__file__).resolve().parents[3]

# A night in a subprocess: claims itself as the CLI does, runs a trivial flow with its temporary
# server started by ``temporary_server`` (argv[2] "night", what ``nas refresh`` does) or by
# Prefect's own client (argv[2] "prefect", a flow run from Python), writes the server's pid, sleeps.
CHILD = """
import contextlib, os, sys, time
from pathlib import Path
import psutil
from prefect import flow
from flows.refresh.prefect_runtime import TOKEN_ENV, claim_night, looks_like_prefect_server, temporary_server

@flow
def trivial():
    return 1

os.environ[TOKEN_ENV] = claim_night().token  # as the CLI does
with temporary_server() if sys.argv[2] == "night" else contextlib.nullcontext():
    trivial()
    server, = [p for p in psutil.Process().children() if looks_like_prefect_server(p.cmdline())]
    print("prefect.server.api.server imported:", "prefect.server.api.server" in sys.modules, flush=True)
    Path(sys.argv[1]).write_text(str(server.pid))
    time.sleep(600)
"""

# A stand-in for the temporary server: sleeps, and its command line reads like Prefect's.
FAKE_SERVER = [sys.executable, "-c", "import time; time.sleep(120)", "-m", "uvicorn", "--factory",
               "prefect.server.api.server:create_app", "--port", "8123"]
# A stand-in for a night's descendant that started a server and is still using it (its own command
# line must not read like a server's, so it builds the server's from a JSON argument).
STARTER = [sys.executable, "-c", "import json, subprocess, sys, time; print(subprocess.Popen(json.loads(sys.argv[1]))"
           ".pid, flush=True); time.sleep(120)", json.dumps(FAKE_SERVER)]


def alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie waiting for init)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def spawn():
    """Start processes (with a night token in their environment if given); all are killed afterwards."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], token: str | None = None, **kw) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if token:
            env[TOKEN_ENV] = token
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, **kw))
        return procs[-1]

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stand-in and anything it started, even if it died
        proc.wait()


def write_record(home: Path, pid: int, started: float) -> tuple[Path, str]:
    folder = records_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    token = f"{pid}@{started:.2f}"
    path = folder / f"{pid}.json"
    path.write_text(json.dumps({"pid": pid, "started": started, "token": token, "argv": ["nas", "refresh"]}))
    return path, token


def started(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).create_time()


def wait_for_file(path: Path, child: subprocess.Popen, log: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while not (path.exists() and path.read_text()):
        if child.poll() is not None:
            pytest.fail(f"child exited ({child.returncode}) early:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"no server after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    return time.monotonic() - t0


def night_env(home: Path) -> dict[str, str]:
    """A night's environment without any Prefect server configured (so a temporary one starts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != TOKEN_ENV}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO), PREFECT_SERVER_EPHEMERAL_ENABLED="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("started_by", ["night", "prefect"])
def test_the_next_night_stops_the_server_a_killed_night_left(tmp_path, caplog, started_by):
    home = tmp_path / "prefect-home"
    marker, log = tmp_path / "server.pid", tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), started_by], cwd=REPO,
                                 env=night_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    try:
        waited = wait_for_file(marker, child, log, timeout=240)
        server = int(marker.read_text())
        print(f"the temporary server (pid {server}) was up {waited:.1f} s after the night started")
        assert looks_like_server(server), psutil.Process(server).cmdline()
        # The night's own server keeps Prefect's server code (74 MB) out of the night's process.
        imported = "night" if started_by == "prefect" else "prefect"
        assert f"prefect.server.api.server imported: {imported == 'night'}" in log.read_text()
        os.kill(child.pid, signal.SIGKILL)  # the night only, as the OOM killer or a scheduler would
        assert child.wait(timeout=30) == -signal.SIGKILL
        # The defect: the killed night's server runs on, and the night's record says who left it.
        time.sleep(0.5)
        assert alive(server), "the server died with the night: nothing to clean up"
        assert [p.name for p in records_dir(home).glob("*.json")] == [f"{child.pid}.json"]

        with caplog.at_level(logging.WARNING, logger=prefect_runtime.__name__):
            stopped = reap_orphans(home)  # what the next night does first
        assert stopped == [server]
        assert not alive(server)
        assert list(records_dir(home).iterdir()) == []
        assert f"removed the temporary Prefect server pid {server}" in caplog.text
        assert f"left by the night pid {child.pid} that was killed" in caplog.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if server is not None and alive(server) and looks_like_server(server):
            psutil.Process(server).kill()


@pytest.mark.slow
def test_the_nights_server_answers_for_the_block_and_is_stopped_after(tmp_path):
    """``temporary_server`` names its server in the settings while the block runs (the flow's runs
    are recorded there), and the server is gone when the block ends."""
    code = """
import json, sys
import httpx, psutil
from prefect import flow
from prefect.settings import PREFECT_API_URL
from flows.refresh.prefect_runtime import temporary_server

@flow
def trivial():
    return 1

with temporary_server() as url:
    assert PREFECT_API_URL.value() == url
    trivial()
    runs = httpx.post(f"{url}/flow_runs/filter", json={}).json()
    server = psutil.Process().children()[0].pid
print(json.dumps({"url": url, "runs": len(runs), "server": server, "after": PREFECT_API_URL.value(),
                  "imported": "prefect.server.api.server" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=night_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["url"].startswith("http://127.0.0.1:") and got["url"].endswith("/api")
    assert got["runs"] == 1 and got["after"] is None and got["imported"] is False
    assert not alive(got["server"])


def test_no_server_is_started_when_one_is_configured(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(prefect_runtime, "_start_server", lambda *a: pytest.fail("started a server"))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with prefect_runtime.temporary_server() as url:
            assert url is None and PREFECT_API_URL.value() == "http://127.0.0.1:4200/api"


def looks_like_server(pid: int) -> bool:
    try:
        return prefect_runtime.looks_like_prefect_server(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False


def test_a_live_nights_server_and_record_are_left_alone(tmp_path, spawn):
    night = spawn(["sleep", "100"])
    record, token = write_record(tmp_path, night.pid, started(night))
    server = spawn(FAKE_SERVER, token=token)
    time.sleep(0.2)
    assert reap_orphans(tmp_path) == []
    assert alive(night.pid) and alive(server.pid)
    assert record.exists()


def test_a_dead_nights_server_is_stopped_but_nothing_else(tmp_path, spawn, caplog):
    """The night's pid now belongs to an unrelated ``sleep`` (another start time): the night is dead,
    the sleep is spared; of the processes carrying its token, only the Prefect server is stopped."""
    reused = spawn(["sleep", "100"])
    record, token = write_record(tmp_path, reused.pid, started(reused) - 3600)
    server = spawn(FAKE_SERVER, token=token)
    other_child = spawn(["sleep", "100"], token=token)  # e.g. a dvc or git the night started
    unrelated_server = spawn(FAKE_SERVER, token="4242@1.00")  # another night's
    time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger=prefect_runtime.__name__):
        assert reap_orphans(tmp_path) == [server.pid]
    assert not alive(server.pid)
    assert alive(reused.pid) and alive(other_child.pid) and alive(unrelated_server.pid)
    assert not record.exists()
    assert f"removed the temporary Prefect server pid {server.pid} (port 8123) left by the night pid " \
           f"{reused.pid}" in caplog.text


def test_a_server_whose_starter_still_runs_is_left_alone(tmp_path, spawn):
    """A descendant of the dead night that started a server and still runs is still using it."""
    record, token = write_record(tmp_path, 2**22 + 17, 1.0)  # a pid no process has
    starter = spawn(STARTER, token=token, stdout=subprocess.PIPE, text=True)
    server = int(starter.stdout.readline())
    time.sleep(0.2)
    assert reap_orphans(tmp_path) == []
    assert alive(server)
    assert not record.exists()


def test_what_reads_as_a_prefect_server():
    looks = prefect_runtime.looks_like_prefect_server
    assert looks(["/usr/bin/python3", "-m", "uvicorn", "--app-dir", "/x/site-packages", "--factory",
                  "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", "8431"])
    assert looks(["/venv/bin/python", "/venv/bin/prefect", "server", "start", "--port", "4200"])
    assert looks(FAKE_SERVER)
    assert not looks(["grep", "prefect.server.api.server:create_app"])
    assert not looks(["/venv/bin/prefect", "flow-run", "ls"])
    assert not looks(STARTER)
    assert not looks([])


def test_records_that_cannot_be_read_are_dropped(tmp_path):
    folder = records_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "123.json").write_text("{not json")
    (folder / "124.json").write_text(json.dumps({"pid": 124}))
    assert reap_orphans(tmp_path) == []
    assert list(folder.iterdir()) == []
    assert reap_orphans(tmp_path / "nowhere") == []


def test_claim_night_records_the_process_and_its_exit_removes_the_record(tmp_path):
    code = ("import os, sys; from pathlib import Path\n"
            "from flows.refresh.prefect_runtime import claim_night, TOKEN_ENV\n"
            "claim = claim_night(Path(sys.argv[1])); assert claim.path.exists(), claim\n"
            "print(claim.path, claim.token, claim.path.read_text(), sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    path, token, text = done.stdout.splitlines()
    record = json.loads(text)
    assert Path(path) == records_dir(tmp_path) / f"{record['pid']}.json"
    assert token == record["token"] == f"{record['pid']}@{record['started']:.2f}"
    assert not Path(path).exists()  # removed at a normal exit
    assert list(records_dir(tmp_path).iterdir()) == []


def test_nas_refresh_claims_the_night_before_the_flow_runs(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import flows.refresh.flow
    from flows.cli.app import app

    calls = []
    monkeypatch.setattr(prefect_runtime, "claim_night", lambda home=None: calls.append("claim"))
    monkeypatch.setattr(flows.refresh.flow, "nightly_refresh", lambda *args: calls.append("flow") or [])
    result = CliRunner().invoke(app, ["refresh", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert calls == ["claim", "flow"]
