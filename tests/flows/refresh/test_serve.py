"""``flows.refresh.serve``: schedule and server checks (fast), and a real server + served deployment (slow)."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.refresh.serve import (
    ScheduleError,
    ServeError,
    check_cron,
    check_server,
    check_timezone,
    deployment_name,
    serve,
)

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 180.0  # the server and the serving process each, on a loaded 2-core machine
RUN_TIMEOUT_S = 180.0
RUNNER_PREFETCH_S = 10  # prefect.runner.Runner's default prefetch_seconds, which serve() keeps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_params(tmp_path: Path) -> Path:
    """params.yaml whose pipeline paths all live in ``tmp_path``, with an empty inbox."""
    paths = {k: str(tmp_path / "data" / k) for k in ("inbox", "accepted", "quarantine", "checkpoints", "reports")}
    paths["ledger"] = str(tmp_path / "data" / "ledger.jsonl")
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": paths}), encoding="utf-8")
    return params


@contextlib.contextmanager
def api_url_setting(url: str | None) -> Iterator[None]:
    """PREFECT_API_URL for this process (unset with None), whatever a harness set before."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url is None:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield
    else:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield


# --- fast: no server ------------------------------------------------------------------------------

def test_deployment_name() -> None:
    assert deployment_name() == "nightly-refresh/nightly"
    assert deployment_name("weekly") == "nightly-refresh/weekly"


@pytest.mark.parametrize("cron", ["0 2 * *", "0 2 * * * 0", "61 2 * * *", "0 25 * * *", "H 2 * * *", "nightly"])
def test_bad_cron_is_an_error(tmp_path: Path, cron: str) -> None:
    with pytest.raises(ScheduleError, match="invalid cron expression"):
        check_cron(cron)
    with pytest.raises(ValueError, match="invalid cron expression"):  # a ScheduleError is a ValueError too
        serve(write_params(tmp_path), cron=cron)


def test_good_cron_and_timezone_pass() -> None:
    assert check_cron("0 2 * * *") == "0 2 * * *"
    assert check_cron("30 1 * * 1-5") == "30 1 * * 1-5"
    assert check_timezone("Europe/Berlin") == "Europe/Berlin"
    assert check_timezone("UTC") == "UTC"


@pytest.mark.parametrize("tz", ["Europe/Berln", "Mars/Olympus", "", "+02:00"])
def test_bad_timezone_is_an_error(tmp_path: Path, tz: str) -> None:
    with pytest.raises(ScheduleError, match="unknown timezone"):
        serve(write_params(tmp_path), timezone=tz)


def test_timezone_typo_suggests_the_zone() -> None:
    with pytest.raises(ScheduleError, match="did you mean Europe/Berlin"):
        check_timezone("Europe/Berln")


@pytest.mark.parametrize("kwargs", [{"name": "a/b"}, {"name": ""}, {"retries": -1}, {"retry_delay_seconds": -5}])
def test_bad_options_are_errors(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ServeError, match="deployment name|must be >= 0"):
        serve(write_params(tmp_path), **kwargs)


def test_missing_params_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="does not exist"):
        serve(tmp_path / "nope.yaml")


def test_unset_api_url_is_a_serve_error(tmp_path: Path) -> None:
    params = write_params(tmp_path)
    t0 = time.perf_counter()
    with api_url_setting(None), pytest.raises(ServeError, match="PREFECT_API_URL is not set") as err:
        serve(params)
    assert "prefect server start" in str(err.value)
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(("text", "match"), [("edit:\n  method: sgd\n", "edit.method"),
                                           ("paths: {inbox: [\n", "params.yaml"), ("bogus: 1\n", "bogus")])
def test_invalid_params_file_is_a_serve_error(tmp_path: Path, text: str, match: str) -> None:
    """Checked up front, before the server: a typo in params.yaml fails now, not at 2 am."""
    bad = tmp_path / "params.yaml"
    bad.write_text(text, encoding="utf-8")
    with api_url_setting(None), pytest.raises(ServeError, match=match):
        serve(bad)


def test_unreachable_server_is_a_serve_error(tmp_path: Path) -> None:
    params = write_params(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    t0 = time.perf_counter()
    with api_url_setting(url), pytest.raises(ServeError, match="no Prefect server") as err:
        serve(params)
    assert url in str(err.value) and "prefect server start" in str(err.value)
    assert "PREFECT_API_URL" in str(err.value)
    assert time.perf_counter() - t0 < 30


@contextlib.contextmanager
def fake_health_server() -> Iterator[str]:
    """An HTTP server answering ``/api/health`` with 200 and everything else with 404; yields ``.../api``."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/api/health":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"true")
            else:
                self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_health_check_passes_and_a_wrong_api_path_is_a_serve_error() -> None:
    with fake_health_server() as url:
        assert check_server(url) == url
        assert check_server(url + "/") == url + "/"
        with pytest.raises(ServeError, match="HTTP 404.*ends in /api"):
            check_server(url.removesuffix("/api"), timeout=10)


# --- slow: a real server and a real served deployment ---------------------------------------------

def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", GX_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:] if log.exists() else "(no log)"


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group (the process and its children), SIGKILL what is left after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # children of an exited leader, too
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@contextlib.contextmanager
def background(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group, output to ``log``, always stopped on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            _stop(proc)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, proc: subprocess.Popen, log: Path,
              every: float = 1.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail early when ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(every)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_serve_against_a_real_server(tmp_path: Path) -> None:
    """``prefect server start`` + ``serve()`` in subprocesses; the deployment carries the schedule,
    the no-overlap limit, the retries and the params; a triggered run completes; a second run
    triggered at the same time is cancelled by the concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    t0 = time.monotonic()
    params = write_params(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = _env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                  "--no-ui"]
    serve_code = ("from flows.refresh.serve import serve; "
                  f"serve({str(params)!r}, cron='0 2 * * *', timezone='Europe/Berlin', retries=1, "
                  "retry_delay_seconds=5)")
    # The runner polls every 10 s by default; 1 s keeps the test short (the only test-only setting).
    serve_env = _env(tmp_path, PREFECT_API_URL=url, PREFECT_RUNNER_POLL_FREQUENCY="1")

    with background(server_cmd, server_env, server_log) as server:
        wait_for("prefect server /api/health", lambda: _healthy(url), STARTUP_TIMEOUT_S, server, server_log)
        t_server = time.monotonic() - t0
        with background([sys.executable, "-c", serve_code], serve_env, serve_log) as served, \
                api_url_setting(url), get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name(deployment_name())
                except ObjectNotFound:
                    return None

            dep = wait_for("the served deployment", deployment, STARTUP_TIMEOUT_S, served, serve_log)
            t_deployed = time.monotonic() - t0
            assert dep.entrypoint == "flows.refresh.flow.nightly_refresh"
            assert dep.parameters == {"params_file": str(params.resolve()), "project": str(REPO)}
            assert not dep.paused
            [sched] = dep.schedules
            assert sched.active
            assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "Europe/Berlin"
            assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
            assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW

            # Two runs at once: one completes, the other is cancelled by the deployment's limit.
            # Both are scheduled for the same instant beyond the runner's 10 s prefetch window, so
            # one poll sees both and proposes both as Pending together. Scheduled for "now", the
            # first could finish (an empty inbox takes ~1.5 s) before the second is created, and
            # both would complete: the limit is about overlap, not about count.
            at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=RUNNER_PREFETCH_S + 8)
            runs = [run_deployment(deployment_name(), scheduled_time=at, timeout=0) for _ in range(2)]
            assert datetime.datetime.now(datetime.timezone.utc) < at - datetime.timedelta(seconds=RUNNER_PREFETCH_S), \
                "creating the two runs took so long that the runner may have seen them apart"

            def finished():
                now = [client.read_flow_run(r.id) for r in runs]
                return now if all(r.state is not None and r.state.is_final() for r in now) else None

            done = wait_for("the triggered runs", finished, RUN_TIMEOUT_S, served, serve_log)
            t_run = time.monotonic() - t0
            by_type = {r.state.type: r for r in done}
            assert set(by_type) == {StateType.COMPLETED, StateType.CANCELLED}, \
                f"{[(r.name, r.state) for r in done]}\n{_tail(serve_log)}"
            assert "concurrency limit" in (by_type[StateType.CANCELLED].state.message or "")
            ok = by_type[StateType.COMPLETED]
            assert ok.state.name == "Completed"
            assert ok.parameters == {"params_file": str(params.resolve()), "project": str(REPO)}
            # The engine records the served flow's own retry policy on the run it executes.
            assert ok.empirical_policy.retries == 1 and ok.empirical_policy.retry_delay == 5
            assert client.read_flow_run(ok.id).state.is_completed()
            assert (tmp_path / "data" / ".refresh.lock").exists()  # the run used the tmp params, not the repo's
        assert served.returncode is not None
    print(f"\nserver healthy after {t_server:.0f} s, deployment after {t_deployed:.0f} s, "
          f"runs final after {t_run:.0f} s, total {time.monotonic() - t0:.0f} s")
