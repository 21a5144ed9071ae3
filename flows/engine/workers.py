"""What a unit of independent work needs in the process it runs in (a study's method or layer, an
evaluation's scoring shard): the base model, loaded once per process; a torch thread count; a Dask
client for the runner it was given.

A unit never receives the model from the driver: it loads the base model itself and checks its
weights hash, so the sequential and the Dask run compute the same bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flows.config.runner import RunnerSettings
from flows.engine.base import BaseModel, fetch_base
from flows.engine.precision import runtime
from nas_core.deltas import weights_hash

log = logging.getLogger(__name__)

#: Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which turns off glibc's dynamic mmap
#: threshold: every large tensor is then a fresh mmap (SmolLM2: 20x the page faults, 80 s of system
#: time in a 4-minute study). Local clusters' workers keep the allocator's default.
DEFAULT_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


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


def ident_for(source: str, params, base_hash: str) -> BaseIdent:
    """The identity of ``source`` loaded with params.yaml's model cache and runtime."""
    device, dtype = runtime(params.runtime.device, params.runtime.dtype)
    return BaseIdent(source, params.roots.models, device, dtype, base_hash)


def driver_base(source: str, params) -> tuple[BaseIdent, BaseModel]:
    """The driver's base model (params.yaml's paths and runtime) and its identity for the units;
    the units running in this process (the sequential run) reuse it."""
    device, dtype = runtime(params.runtime.device, params.runtime.dtype)
    base = fetch_base(source, params.roots.models, device, dtype)
    ident = ident_for(source, params, base.base_hash)
    remember(ident, base)
    return ident, base


def load_ident(ident: BaseIdent, logger: logging.Logger | logging.LoggerAdapter = log) -> BaseModel:
    """A fresh load of ``ident``'s model in this process, refused unless it hashes to the base."""
    t0 = time.perf_counter()
    base = fetch_base(ident.source, ident.models_root, ident.device, ident.dtype)
    if base.base_hash != ident.base_hash:
        raise RuntimeError(f"{ident.source} loads with weights hash {base.base_hash[:12]} in process "
                           f"{os.getpid()}, the driver's base is {ident.base_hash[:12]}")
    logger.info("loaded the base model %s in %.1f s (process %d)", base.name, time.perf_counter() - t0,
                os.getpid())
    return base


def unit_base(ident: BaseIdent, logger: logging.Logger | logging.LoggerAdapter = log) -> BaseModel:
    """The base model of ``ident`` in this process: loaded on first use, then reused while its
    weights still hash to the base (a unit that failed half-way leaves it edited: reloaded)."""
    base = _BASES.get(ident)
    if base is not None and weights_hash(base.model) == ident.base_hash:
        return base
    base = load_ident(ident, logger)
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


def in_dask_worker() -> bool:
    """Whether this code runs inside a task on a Dask worker."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def dask_client(runner: RunnerSettings) -> Iterator:
    """A Dask client for ``runner``: inside a task on a worker, the task's own cluster (the task
    secedes from the worker's pool while it waits, so its slot can run the shards); else the
    cluster at ``runner.address``, or a new local cluster of ``runner.workers`` processes (one
    task thread each) for the duration."""
    import dask
    from distributed import Client, LocalCluster, worker_client

    if in_dask_worker():
        with worker_client() as client:
            yield client
        return
    with dask.config.set(DEFAULT_MALLOC):
        if runner.address is not None:
            with Client(runner.address) as client:
                yield client
            return
        workers = runner.workers or os.cpu_count() or 1
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            yield client
