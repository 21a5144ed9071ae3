"""Deploy the nightly refresh to a Prefect work pool: the production form of :mod:`flows.refresh.serve`.

``nas serve`` runs the nights in the process that serves them. ``nas deploy`` registers a
deployment on the Prefect server instead, in a **work pool**, and any number of workers on any
machines (``prefect worker start --pool POOL``) pick its runs up: one deployment per model
(per params file), each with its own schedule, and never two runs of a deployment at once (a
deployment concurrency limit of 1, ``CANCEL_NEW``: a run that would overlap is cancelled by the
server). Two deployments of the *same* model are kept apart by the night's own per-model slot
(params.yaml ``lock.prefect_slot``). docs/deploy.md has the topology and every start command.

The deployment's code is the folder this package was installed from (``flow.from_source``, the
entrypoint ``flows/refresh/flow.py:nightly_refresh``); its data is the model's project (params
file, ledger, DVC repository). A worker on another machine needs both at the same paths, or a
work pool whose job template brings them (an image, a git clone, a shared volume).
"""

from __future__ import annotations

from pathlib import Path

from flows.refresh.serve import (
    ServeError,
    check_name,
    check_retries,
    check_server,
    checked_deployment,
    nightly_schedule,
)

ENTRYPOINT = "flows/refresh/flow.py:nightly_refresh"

#: The folder holding the ``flows`` package: the code a worker runs.
CODE_DIR = Path(__file__).resolve().parents[2]

#: The work pool type ``nas deploy`` creates when the pool does not exist yet (a subprocess per
#: run on the worker's machine). A pool of another type (kubernetes, ecs...) is made by its operator.
DEFAULT_POOL_TYPE = "process"


#: A worker's night never passes the ``nas`` command's logging setup: keep Dask's own INFO lines
#: (a dask anchor or scoring runner) out of its log as the command does; the pool's env may say otherwise.
QUIET_DASK = {"DASK_LOGGING__DISTRIBUTED": "warning"}


def retry_env(retries: int, retry_delay_seconds: int) -> dict[str, str]:
    """The environment that gives a worker's flow-run process the night's flow-level retries.

    A worker loads the flow from its entrypoint, so options set on this process's flow object
    (``with_options``, as :func:`flows.refresh.serve.serve` does) never reach it; Prefect's flow
    defaults are read when the entrypoint is imported there, and the engine copies them into the
    run's retry policy. Every standard work pool type passes a deployment's ``env`` job variable
    to the run's process. Only the nightly flow runs in that process, so only it retries.

    Raises:
        ServeError: a negative count or delay.
    """
    check_retries(retries, retry_delay_seconds)
    return {"PREFECT_FLOWS_DEFAULT_RETRIES": str(retries),
            "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": str(retry_delay_seconds)}


def ensure_pool(pool: str, create: bool) -> dict[str, str]:
    """The default ``env`` of work pool ``pool``'s job template, the pool created as a process
    pool (no env) when missing and ``create``."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            if not create:
                raise ServeError(f"no work pool {pool!r} on the Prefect server: create it with `prefect work-pool "
                                 f"create {pool} --type process` or pass --create-pool") from None
            found = client.create_work_pool(WorkPoolCreate(name=pool, type=DEFAULT_POOL_TYPE))
    env = found.base_job_template.get("variables", {}).get("properties", {}).get("env", {}).get("default") or {}
    return {str(k): str(v) for k, v in env.items()}


def deploy(params_file: Path | None, pool: str, name: str, cron: str = "0 2 * * *", timezone: str = "UTC",
           create_pool: bool = True, project: Path | None = None, retries: int = 2,
           retry_delay_seconds: int = 600) -> str:
    """Register ``nightly-refresh/NAME`` in work pool ``pool`` with its schedule; returns its id.

    ``project`` (default: :func:`flows.paths.project_root`) is the model's project: its params
    file and data (ledger, DVC repository) are what the nights use; the code is :data:`CODE_DIR`.
    A failed night is retried ``retries`` times, ``retry_delay_seconds`` apart, on its worker
    (:func:`retry_env`; as ``nas serve``: batches already promoted are never applied twice).

    Raises:
        ScheduleError: bad cron expression or timezone.
        ServeError: no reachable Prefect server, missing or invalid params file, bad name,
            no such pool (and ``create_pool`` False), negative retries.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.refresh.flow import nightly_refresh

    schedule = nightly_schedule(cron, timezone)
    env = retry_env(retries, retry_delay_seconds)
    project, params_path, params = checked_deployment(params_file, name, project)
    check_name("work pool", pool)
    check_server()
    # A deployment's env replaces the pool's default env as a whole: keep the pool's variables.
    env = {**QUIET_DASK, **ensure_pool(pool, create_pool), **env}
    model = params.model
    source = nightly_refresh.from_source(source=str(CODE_DIR), entrypoint=ENTRYPOINT)
    deployment_id = source.deploy(
        name=name,
        work_pool_name=pool,
        schedule=schedule,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"params_file": str(params_path), "project": str(project)},
        job_variables={"env": env},
        description=f"The nightly knowledge-editing refresh of {model} with {params_path}",
        tags=["nas", "nightly", f"model:{Path(model).stem}"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)

