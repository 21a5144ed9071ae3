"""``nas deploy``'s checks before it touches a server (fast); the deployment itself runs in tests/topology."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_serve import api_url_setting, free_port, write_params

from flows.refresh.deploy import CODE_DIR, ENTRYPOINT, deploy, retry_env
from flows.refresh.serve import ScheduleError, ServeError


def test_the_entrypoint_is_the_nightly_flow_in_this_code() -> None:
    path, _, name = ENTRYPOINT.partition(":")
    assert (CODE_DIR / path).is_file() and name == "nightly_refresh"


@pytest.mark.parametrize("pool", ["", "a/b", "x%y"])
def test_bad_pool_names_are_refused(tmp_path, pool) -> None:
    with pytest.raises(ServeError, match="invalid work pool name"):
        deploy(write_params(tmp_path), pool, "tiny", project=tmp_path)


def test_bad_schedule_and_params_fail_before_the_server(tmp_path) -> None:
    params = write_params(tmp_path)
    with pytest.raises(ScheduleError, match="invalid cron"):
        deploy(params, "pool", "tiny", cron="every night", project=tmp_path)
    with pytest.raises(ServeError, match="does not exist"):
        deploy(tmp_path / "nope.yaml", "pool", "tiny", project=tmp_path)
    with pytest.raises(ServeError, match=r"retries \(-1\) and retry_delay_seconds \(600\) must be >= 0"):
        deploy(params, "pool", "tiny", project=tmp_path, retries=-1)


@pytest.mark.slow
def test_a_flow_run_process_with_the_deployment_env_retries_the_night() -> None:
    """What a worker's run process does: import the entrypoint with the deployment's env."""
    path, _, name = ENTRYPOINT.partition(":")
    module = path.removesuffix(".py").replace("/", ".")
    code = f"from {module} import {name} as f; print(f.retries, f.retry_delay_seconds)"
    env = {**os.environ, **retry_env(3, 120)}
    got = subprocess.run([sys.executable, "-c", code], env=env, cwd=CODE_DIR, capture_output=True, text=True,
                         check=True, timeout=120)
    assert got.stdout.split() == ["3", "120"]
    plain = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items()
                                                            if not k.startswith("PREFECT_FLOWS_DEFAULT_RETR")},
                           cwd=CODE_DIR, capture_output=True, text=True, check=True, timeout=120)
    assert plain.stdout.split() == ["0", "0"]  # `nas night` and tests: no retries


def test_no_server_is_a_serve_error_naming_the_url(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with api_url_setting(url), pytest.raises(ServeError, match="no Prefect server") as err:
        deploy(write_params(tmp_path), "pool", "tiny", project=tmp_path)
    assert url in str(err.value)
