"""``nas deploy``'s checks before it touches a server (fast); the deployment itself runs in tests/topology."""

from __future__ import annotations

import pytest
from test_serve import api_url_setting, free_port, write_params

from flows.refresh.deploy import CODE_DIR, ENTRYPOINT, deploy
from flows.refresh.serve import ScheduleError, ServeError


def test_the_entrypoint_is_the_nightly_flow_in_this_code() -> None:
    path, _, name = ENTRYPOINT.partition(":")
    assert (CODE_DIR / path).is_file() and name == "nightly_refresh"


@pytest.mark.parametrize("pool", ["", "a/b", "x%y"])
def test_bad_pool_names_are_refused(tmp_path, pool) -> None:
    with pytest.raises(ServeError, match="invalid work pool name"):
        deploy(write_params(tmp_path), pool, "tiny", project=tmp_path)


def test_bad_schedule_and_params_fail_before_the_server(tmp_path) -> None:
    with pytest.raises(ScheduleError, match="invalid cron"):
        deploy(write_params(tmp_path), "pool", "tiny", cron="every night", project=tmp_path)
    with pytest.raises(ServeError, match="does not exist"):
        deploy(tmp_path / "nope.yaml", "pool", "tiny", project=tmp_path)


def test_no_server_is_a_serve_error_naming_the_url(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with api_url_setting(url), pytest.raises(ServeError, match="no Prefect server") as err:
        deploy(write_params(tmp_path), "pool", "tiny", project=tmp_path)
    assert url in str(err.value)
