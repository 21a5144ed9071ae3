"""The temporary Prefect server of a night run without ``PREFECT_API_URL``: its start, and the
cleanup of one a killed night leaves running.

With no ``PREFECT_API_URL`` set, Prefect 3 starts a temporary API server the first time a flow
talks to its API (``SubprocessASGIServer`` in prefect/server/api/server.py: ``python -m uvicorn
... prefect.server.api.server:create_app``). Importing that module brings Prefect's whole server
(FastAPI, its ORM, docket, redis and asyncpg clients: about 74 MB of resident memory, measured in
docs/integrity.md) into the night's process, where it stays under the night's peak although
only the child runs it. :func:`temporary_server` starts the same command with the same
environment without that import, and names the server in the settings for the run.

A night that is SIGKILLed (or dies of SIGTERM, which skips ``atexit`` and ``finally`` too) never
stops its server: the server, reparented to init, runs forever, one more per killed night.

The cleanup has two halves, both called through :func:`claim_night` before the CLI runs a flow:

* the night writes a record of itself (pid and process start time) under the Prefect home, and
  the CLI puts the token naming it into its environment. Every process it starts inherits the token, the
  server included, whenever and from whichever thread Prefect starts it, so the flow needs no
  hook and there is no window between a server's start and its record;
* :func:`reap_orphans` (so, the next night) takes each record whose night is gone (pid gone,
  a zombie, or reused by a process started at another time), stops the processes that carry
  that night's token AND whose command line is a Prefect server, and removes the record. A pid
  reused by an unrelated process carries no token, and the night's other children (git, dvc)
  are no servers, so neither is ever killed.

Not PR_SET_PDEATHSIG: Prefect's ``Popen`` takes no ``preexec_fn``, and the signal follows the
*thread* that started the child, which can be a worker thread that ends long before the night.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from flows.io import atomic_write_text

log = logging.getLogger(__name__)

TOKEN_ENV = "NAS_NIGHT_TOKEN"
"""Environment variable naming the night (``PID@START``) in every process the night starts."""
RECORDS_DIR = "nas-nights"
"""Folder under the Prefect home with one ``PID.json`` record per night that may own a server."""
SERVER_APP = "prefect.server.api.server:create_app"
"""The uvicorn app factory Prefect's temporary server runs (``python -m uvicorn --factory SERVER_APP``)."""
_SAME_START_S = 0.5  # two start times closer than this are the same process (psutil: 10 ms ticks)
_PORT_TAKEN = 3  # uvicorn's exit code when the port it was given is in use
_PORT_TRIES = 3  # ports tried when another process takes the free one before the server binds it
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's ``SubprocessASGIServer`` adds to a temporary server's environment (no UI)."""


def records_dir(home: Path | None = None) -> Path:
    """The records folder under ``home`` (default: the Prefect home of the current settings)."""
    if home is None:
        from prefect.settings import get_current_settings

        home = Path(get_current_settings().home)
    return Path(home) / RECORDS_DIR


def looks_like_prefect_server(cmdline: list[str]) -> bool:
    """Is this command line a Prefect API server: uvicorn serving Prefect's app, or ``prefect server start``?

    Whole arguments are compared, so a command that merely mentions the app (a grep) is none.
    """
    names = [Path(arg).name for arg in cmdline]
    if "uvicorn" in names and SERVER_APP in cmdline:
        return True
    return any(name == "prefect" and cmdline[i + 1:i + 3] == ["server", "start"] for i, name in enumerate(names))


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """Start a temporary Prefect API server for the block when none is configured, and stop it after.

    Yields its API URL, set as ``PREFECT_API_URL`` in the settings while the block runs (so the
    flow's client, and Dask workers that get the settings, all report to it); yields None and
    starts nothing when ``PREFECT_API_URL`` is set or temporary servers are disabled. Same
    command line as Prefect's own (so :func:`reap_orphans` knows it) and the same environment,
    this process's included (so it carries the night's token).

    Raises:
        RuntimeError: the server exited or did not answer its health check in time.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    env = {**os.environ, **_SERVER_ENV, **get_current_settings().to_environment_variables(exclude_unset=True)}
    server, url = _start_server(env, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        _stop_child(server)


def _start_server(env: dict[str, str], timeout: float) -> tuple[subprocess.Popen, str]:
    """A running server and its API URL: a free port, then ``/health`` polled until it answers 200."""
    import httpx
    import prefect

    for _ in range(_PORT_TRIES):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             SERVER_APP, "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env)
        log.info("starting a temporary Prefect server on %s", url)
        deadline = time.monotonic() + timeout
        while server.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return server, url
            time.sleep(0.1)
        if server.poll() == _PORT_TAKEN:
            continue  # another process took the port between the probe and the bind
        code = server.poll()
        _stop_child(server)
        why = f"exited with code {code}" if code is not None else \
            f"did not answer in {timeout:.0f} s (busy machine? raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        raise RuntimeError(f"the temporary Prefect server at {url} {why}")
    raise RuntimeError(f"the temporary Prefect server found its port taken {_PORT_TRIES} times")


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues for the server, before it stops: otherwise
    its workers retry a server that is gone at exit (a minute, then "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception as err:  # never let a log flush fail the night that already ran
            log.warning("could not send Prefect's queued %s to the temporary server: %s", worker.__name__, err)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS's choice)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_child(server: subprocess.Popen) -> None:
    """Stop the server this process started (as :func:`_stop` does) and reap it."""
    with contextlib.suppress(psutil.NoSuchProcess):
        _stop([psutil.Process(server.pid)], timeout=5.0)
    server.wait()


@dataclass(frozen=True)
class NightClaim:
    """This process's night record and the token its children must carry in ``TOKEN_ENV``."""

    path: Path
    token: str


def claim_night(home: Path | None = None) -> NightClaim | None:
    """Clean up after dead nights, then record this process as a night; call before running a flow
    and put the returned token in the environment as ``TOKEN_ENV`` (the CLI does).

    None when the record could not be written (logged: the night still runs, only an orphan it
    might leave would not be cleaned up). The record is removed when this process exits
    normally; a killed process leaves it for the next night's reaper.
    """
    folder = records_dir(home)
    reap_orphans(folder.parent)
    me = psutil.Process()
    started = me.create_time()
    token = f"{me.pid}@{started:.2f}"
    record = {"pid": me.pid, "started": started, "token": token, "argv": sys.argv}
    path = folder / f"{me.pid}.json"
    try:
        atomic_write_text(path, json.dumps(record))  # the reaper never reads half a record
    except OSError as err:
        log.warning("could not record this night in %s (%s): a Prefect server it leaves if killed "
                    "will not be cleaned up", folder, err)
        return None
    atexit.unregister(_forget)
    atexit.register(_forget, path)
    return NightClaim(path, token)


def reap_orphans(home: Path | None = None, timeout: float = 5.0) -> list[int]:
    """Stop the Prefect servers of nights that died, and drop their records; returns the pids stopped.

    A record stays while one of its servers will not stop (the next night tries again); an unreadable
    one is logged and dropped. Records of live nights are not touched.
    """
    folder = records_dir(home)
    stopped: list[int] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read(path)
        if record is None:
            _forget(path)
            continue
        if _night_alive(record):
            continue
        servers = dict(_orphaned_servers(record["token"]))
        gone = _stop(list(servers), timeout)
        for proc in gone:
            log.warning("removed the temporary Prefect server pid %d (port %s) left by the night pid %d "
                        "that was killed", proc.pid, servers[proc], record["pid"])
        stopped += [proc.pid for proc in gone]
        if len(gone) == len(servers):  # else keep the record: the next night tries again
            _forget(path)
    return stopped


def _read(path: Path) -> dict | None:
    """The record at ``path`` with its fields typed, or None (logged) when it is unreadable."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {"pid": int(raw["pid"]), "started": float(raw["started"]), "token": str(raw["token"])}
    except (OSError, ValueError, TypeError, KeyError) as err:
        log.warning("dropping the unreadable night record %s (%s)", path, err)
        return None


def _night_alive(record: dict) -> bool:
    """Is the record's night still running: same pid, same start time, not a zombie?"""
    try:
        proc = psutil.Process(record["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - record["started"]) < _SAME_START_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: never act on a night that might be alive


def _orphaned_servers(token: str) -> list[tuple[psutil.Process, str]]:
    """(process, port) of each live Prefect server carrying ``token`` whose starter is gone.

    A server whose parent still carries the token was started by a descendant of the dead
    night that is still running (and using it): that one is left alone.
    """
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not looks_like_prefect_server(cmdline):
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or proc.environ().get(TOKEN_ENV) != token:
                continue
            parent = proc.parent()
            if parent is not None and _environ(parent).get(TOKEN_ENV) == token:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        port = cmdline[cmdline.index("--port") + 1] if "--port" in cmdline[:-1] else "?"
        found.append((proc, port))
    return found


def _environ(proc: psutil.Process) -> dict[str, str]:
    """The environment ``proc`` was started with, or {} when it cannot be read."""
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def _stop(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """SIGTERM ``procs``, then SIGKILL those still running after ``timeout`` s; returns those stopped.

    psutil checks each process's start time before signalling, so a pid reused meanwhile is spared.
    A zombie counts as stopped: its new parent (init) reaps it in its own time.
    """
    left = list(procs)
    for signal_it in (psutil.Process.terminate, psutil.Process.kill):
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_it(proc)
        _, left = psutil.wait_procs(left, timeout=timeout)
        left = [proc for proc in left if not _zombie(proc)]
        if not left:
            break
    for proc in left:
        log.warning("the temporary Prefect server pid %d did not stop", proc.pid)
    return [proc for proc in procs if proc not in left]


def _zombie(proc: psutil.Process) -> bool:
    """Has ``proc`` exited (a zombie, or gone)?"""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _forget(path: Path) -> None:
    """Remove a night record (missing is fine)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove the night record %s (%s)", path, err)
