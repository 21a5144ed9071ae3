"""Where a study's independent units (one horizon method, one sweep layer) run: one after another
in this process, or as Prefect tasks on a ``prefect-dask`` ``DaskTaskRunner``.

A unit never receives the model from the driver: it loads the base model itself, once per
process (:func:`unit_base`), and runs with an explicit torch thread count (:func:`unit_threads`),
so the sequential and the Dask run compute the same bits.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from prefect.task_runners import ThreadPoolTaskRunner

from flows.engine.loading import BaseModel, fetch_base
from flows.engine.precision import runtime
from nas_core.deltas import weights_hash

RUNNERS = ("sequential", "dask")


@dataclass(frozen=True)
class RunnerSettings:
    """How a study runs its units (``--runner``, ``--address``, ``--workers``, ``--threads``).

    Attributes:
        kind: ``sequential`` (one unit after another in this process) or ``dask``.
        address: an existing Dask scheduler (``tcp://host:8786``); its workers need the project's
            folders (model cache, statistics) at the same paths. None: a local cluster.
        workers: processes of the local cluster (one task thread each); None: one per CPU core.
        threads: torch threads of every unit; None keeps the process's count (the sequential run:
            all cores; a Dask worker: 1). Runs with the same value compute the same bits.
    """

    kind: str = "sequential"
    address: str | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.kind!r}")
        if self.address is not None and self.workers is not None:
            raise ValueError("--address and --workers are mutually exclusive (a cluster at an address has its own)")
        if self.kind != "dask" and (self.address is not None or self.workers is not None):
            raise ValueError("--address and --workers need --runner dask")
        if (self.workers is not None and self.workers < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("--workers and --threads must be >= 1")

    def record(self) -> dict[str, Any]:
        """What a study's results say about how they were computed."""
        return asdict(self)


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

    # Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which turns off glibc's dynamic mmap
    # threshold: every large tensor is then a fresh mmap (SmolLM2: 20x the page faults, 80 s of
    # system time in a 4-minute study). The local cluster's workers keep the allocator's default.
    default_malloc = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with _workers_report_here(runner), dask.config.set(default_malloc):
        return study_flow.with_options(task_runner=task_runner(runner))(*args, runner=runner, **kwargs)


@contextlib.contextmanager
def _workers_report_here(runner: RunnerSettings) -> Iterator[None]:
    """Without PREFECT_API_URL, start Prefect's temporary server now and name it in the settings the
    Dask workers receive: each worker would otherwise start a server of its own and record its
    task runs there. (Workers at ``--address`` need a PREFECT_API_URL they can reach.)"""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if runner.kind != "dask" or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's own client would start (stopped at exit)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@dataclass(frozen=True)
class BaseIdent:
    """What identifies the base model a unit starts from: where it is loaded from and its weights hash."""

    source: str
    models_root: Path
    device: str
    dtype: str
    base_hash: str


#: This process's base models (a Dask worker keeps its own), by identity: loaded once, reused by
#: every later unit of the process after a check of the weights hash.
_BASES: dict[BaseIdent, BaseModel] = {}


def remember(ident: BaseIdent, base: BaseModel) -> None:
    """Offer the driver's loaded model to the units running in this process (the sequential run)."""
    if base.base_hash != ident.base_hash:
        raise ValueError(f"model {base.name}: hash {base.base_hash[:12]} is not {ident.base_hash[:12]}")
    _BASES[ident] = base


def driver_base(source: str, params) -> tuple[BaseIdent, BaseModel]:
    """The study driver's base model (statistics, base reference) and its identity for the units;
    the units running in this process (the sequential run) reuse it."""
    device, dtype = runtime(params.runtime.device, params.runtime.dtype)
    base = fetch_base(source, params.roots.models, device, dtype)
    ident = BaseIdent(source, params.roots.models, device, dtype, base.base_hash)
    remember(ident, base)
    return ident, base


def unit_base(ident: BaseIdent, logger) -> BaseModel:
    """The base model of ``ident`` in this process: loaded on first use, then reused while its
    weights still hash to the base (a unit that failed half-way leaves it edited: reloaded)."""
    base = _BASES.get(ident)
    if base is not None and weights_hash(base.model) == ident.base_hash:
        return base
    t0 = time.perf_counter()
    base = fetch_base(ident.source, ident.models_root, ident.device, ident.dtype)
    if base.base_hash != ident.base_hash:
        raise RuntimeError(f"{ident.source} loads with weights hash {base.base_hash[:12]} in process "
                           f"{os.getpid()}, the study's base is {ident.base_hash[:12]}")
    logger.info("loaded the base model %s in %.1f s (process %d)", base.name, time.perf_counter() - t0,
                os.getpid())
    _BASES[ident] = base
    return base


@contextlib.contextmanager
def unit_threads(threads: int | None) -> Iterator[int]:
    """Run a unit with ``threads`` torch threads (None: the process's); yields the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
