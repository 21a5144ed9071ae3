"""Run the nightly refresh on a schedule: a Prefect deployment served by this process.

:func:`serve` registers :func:`flows.refresh.flow.nightly_refresh` as the deployment
``nightly-refresh/nightly`` on a running Prefect server and then blocks, polling the server
for runs and executing them (Prefect's ``flow.serve``), until it is interrupted.

Running it for real::

    # terminal 1: the Prefect server (API + UI on http://127.0.0.1:4200; state in ~/.prefect)
    prefect server start

    # terminal 2: point the client at it and serve the nightly refresh
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    nas serve --cron "0 2 * * *" --timezone Europe/Berlin

    # any terminal (same PREFECT_API_URL): run the refresh now instead of waiting for the night
    prefect deployment run nightly-refresh/nightly

The deployment:

* **schedule**: one cron schedule in an IANA timezone (``prefect.schedules.Cron``), so
  ``0 2 * * *`` in ``Europe/Berlin`` stays at 02:00 local time across daylight saving.
* **no overlapping runs**: a deployment concurrency limit of 1 with the ``CANCEL_NEW``
  collision strategy (``ConcurrencyLimitConfig(limit=1, collision_strategy=
  ConcurrencyLimitStrategy.CANCEL_NEW)``): a run that would start while another run of the
  deployment is active is cancelled by the server instead of queued (the next night picks
  up whatever is still in the inbox). The limit holds across every process serving the
  deployment, and the refresh's own lock file remains the last line of defence.
* **retries**: flow-level retries (``nightly_refresh.with_options(retries=...,
  retry_delay_seconds=...)``): a night that fails with an exception (the MLflow store down,
  another refresh holding the lock...) is retried in the same process after
  ``retry_delay_seconds``. Each attempt starts from the inbox, and batches already promoted
  are never applied twice (the ledger). A run whose process dies (killed, out of memory) is
  *Crashed*, which Prefect does not retry: the next night picks it up.
* **parameters**: ``params_file`` and ``project`` fixed to the absolute paths :func:`serve` resolved.

Stopping ``nas serve`` (Ctrl-C) pauses the schedule on the server (Prefect's
``pause_on_shutdown``); serving again re-activates it.

:func:`serve` refuses to start without a reachable server: with ``PREFECT_API_URL`` unset
Prefect would otherwise quietly start a throw-away in-process server whose schedule and
run history vanish when the process exits.
"""

from __future__ import annotations

import difflib
import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.schedules import Schedule

    from flows.config.params import Params

FLOW_NAME = "nightly-refresh"
DEFAULT_DEPLOYMENT = "nightly"
HEALTH_TIMEOUT_S = 5.0


class ServeError(RuntimeError):
    """The deployment cannot be served (no reachable Prefect server, bad schedule...)."""


class ScheduleError(ServeError, ValueError):
    """The cron expression or the timezone is invalid."""


def deployment_name(name: str = DEFAULT_DEPLOYMENT) -> str:
    """The full deployment name for ``prefect deployment run`` (``nightly-refresh/nightly``)."""
    return f"{FLOW_NAME}/{name}"


def check_timezone(timezone: str) -> str:
    """``timezone`` if it is an IANA zone name (Prefect's own rule), else :class:`ScheduleError`."""
    zones = zoneinfo.available_timezones()
    if timezone not in zones:
        close = difflib.get_close_matches(timezone, sorted(zones), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ScheduleError(f"unknown timezone {timezone!r}{hint}: use an IANA name such as UTC or Europe/Berlin")
    return timezone


def check_cron(cron: str) -> str:
    """``cron`` if it is a valid five-field cron expression, else :class:`ScheduleError`."""
    from prefect.client.schemas.schedules import CronSchedule

    fields = cron.split()
    if len(fields) != 5:
        raise ScheduleError(f"invalid cron expression {cron!r}: expected 5 fields (minute hour day-of-month month "
                            f"day-of-week, e.g. '0 2 * * *' for 02:00 every day), got {len(fields)}")
    try:
        CronSchedule(cron=cron)  # Prefect's public schedule model validates the expression
    except ValueError as err:  # pydantic's ValidationError: keep its one message
        detail = err.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(err, "errors") else str(err)
        raise ScheduleError(f"invalid cron expression {cron!r}: {detail} (e.g. '0 2 * * *' for 02:00 every day)") \
            from None
    return cron


def nightly_schedule(cron: str, timezone: str) -> Schedule:
    """The validated cron schedule in ``timezone``."""
    from prefect.schedules import Cron

    return Cron(check_cron(cron), timezone=check_timezone(timezone))


def api_url() -> str | None:
    """The Prefect API URL the client would use (PREFECT_API_URL, from the environment or the profile)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url or None


def check_server(url: str | None = None, timeout: float = HEALTH_TIMEOUT_S) -> str:
    """The API URL if a Prefect server answers on ``{url}/health``; :class:`ServeError` otherwise."""
    import httpx

    url = url if url is not None else api_url()
    how = "start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
    if not url:
        raise ServeError(f"PREFECT_API_URL is not set: nas serve needs a running Prefect server; {how}")
    health = url.rstrip("/") + "/health"
    try:
        response = httpx.get(health, timeout=timeout)
    except httpx.HTTPError as err:
        raise ServeError(f"no Prefect server at PREFECT_API_URL={url} ({type(err).__name__}: {err or 'no answer'}); "
                         f"{how}") from None
    if response.status_code != 200:
        raise ServeError(f"the Prefect server at PREFECT_API_URL={url} answered {health} with HTTP "
                         f"{response.status_code}; is PREFECT_API_URL right (it ends in /api)? Otherwise {how}")
    return url


def check_name(what: str, value: str) -> str:
    """``value`` if Prefect takes it as a deployment or work pool name, else :class:`ServeError`."""
    if not value or any(c in value for c in "/%&<>"):
        raise ServeError(f"invalid {what} name {value!r}: it must be non-empty without any of / % & < >")
    return value


def checked_deployment(params_file: Path | None, name: str, project: Path | None = None) -> tuple[Path, Path, Params]:
    """``(project, params_path, params)`` once the deployment name and the params file are good: a
    typo in params.yaml fails when the deployment is made, not at 2 am. :class:`ServeError` otherwise."""
    import yaml

    from flows.config.params import load_params
    from flows.paths import project_root

    check_name("deployment", name)
    project = project_root(project)
    params_path = Path(params_file).expanduser().resolve() if params_file else project / "params.yaml"
    if not params_path.is_file():
        raise ServeError(f"params file {params_path} does not exist")
    try:
        params = load_params(params_path, project)
    except (ValueError, yaml.YAMLError) as err:  # flows.config.model.ConfigError, the sections' own checks, bad YAML
        raise ServeError(f"params file {params_path}: {err}") from err
    return project, params_path, params


def check_retries(retries: int, retry_delay_seconds: int) -> None:
    """Refuse a negative flow-retry count or delay (:class:`ServeError`)."""
    if retries < 0 or retry_delay_seconds < 0:
        raise ServeError(f"retries ({retries}) and retry_delay_seconds ({retry_delay_seconds}) must be >= 0")


def serve(params_file: Path | None, cron: str = "0 2 * * *", timezone: str = "UTC", name: str = DEFAULT_DEPLOYMENT,
          retries: int = 2, retry_delay_seconds: int = 600) -> None:
    """Register the nightly refresh as deployment ``nightly-refresh/NAME`` and serve it (blocks).

    Args:
        params_file: the params.yaml every run uses (stored as an absolute path; default: the
            project's). The project directory (:func:`flows.paths.project_root`) is stored too.
        cron: five-field cron expression, evaluated in ``timezone``.
        timezone: IANA timezone of the schedule (``UTC``, ``Europe/Berlin``...).
        name: the deployment's name (the full name is :func:`deployment_name`).
        retries: flow-level retries of a failed night.
        retry_delay_seconds: wait between those retries.

    Raises:
        ScheduleError: bad cron expression or timezone.
        ServeError: PREFECT_API_URL unset or no server answering there, missing or invalid params file,
            bad deployment name or negative retries.
    """
    schedule = nightly_schedule(cron, timezone)
    check_retries(retries, retry_delay_seconds)
    project, params_path, _ = checked_deployment(params_file, name)
    check_server()

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.refresh.flow import nightly_refresh

    flow = nightly_refresh.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    flow.serve(
        name=name,
        schedule=schedule,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"params_file": str(params_path), "project": str(project)},
        description=f"The nightly knowledge-editing refresh with {params_path}",
        tags=["nas", "nightly"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
