"""Where a study's independent units (one horizon method, one sweep layer) run: one after another
in this process, or as Prefect tasks on a ``prefect-dask`` ``DaskTaskRunner``.

A unit never receives the model from the driver: it loads the base model itself, once per
process (:func:`flows.engine.workers.unit_base`), and runs with an explicit torch thread count
(:func:`flows.engine.workers.unit_threads`), so the sequential and the Dask run compute the same bits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from flows.config.runner import RunnerSettings
from flows.engine.workers import DEFAULT_MALLOC
from flows.refresh.prefect_runtime import temporary_server


def task_runner(runner: RunnerSettings):
    """The Prefect task runner of ``runner``: one thread in this process, or a DaskTaskRunner on a
    new local cluster (processes, one task thread each) or on the cluster at ``address``."""
    if runner.kind == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if runner.address is not None:
        return DaskTaskRunner(address=runner.address)
    workers = runner.workers or os.cpu_count() or 1
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def run_study(study_flow, runner: RunnerSettings, *args, **kwargs):
    """Run ``study_flow`` on ``runner``'s task runner (its results record ``runner``)."""
    import dask

    with _workers_report_here(runner), dask.config.set(DEFAULT_MALLOC):
        return study_flow.with_options(task_runner=task_runner(runner))(*args, runner=runner, **kwargs)


@contextlib.contextmanager
def _workers_report_here(runner: RunnerSettings) -> Iterator[None]:
    """Without PREFECT_API_URL, start the temporary server now and name it in the settings the
    Dask workers receive: each worker would otherwise start a server of its own and record its
    task runs there. (Workers at ``--address`` need a PREFECT_API_URL they can reach.)"""
    if runner.kind != "dask":
        yield
        return
    with temporary_server():
        yield
