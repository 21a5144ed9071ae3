"""The NAS anchor's pilot batches optimised here or on a Dask cluster.

The pilots are cut into batches of ``nas.pilot_batch_size`` (:func:`nas_core.anchor.pilot_batches`)
and each batch is optimised where the runner says. A batch's v* depend only on the batch and the
torch threads, so the norms are the sequential run's at the same ``runner.threads``.

On a Dask worker a batch runs on the worker's own copy of the base model
(:func:`flows.engine.workers.unit_base`: loaded once per process, its weights hash checked before
every batch), so pilots never run on an edited model, one batch at a time per process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flows.config.runner import RunnerSettings
from flows.engine.workers import BaseIdent, dask_client, unit_base, unit_threads
from nas_core.anchor import batch_norms, pilot_batches, pilot_norms_here
from nas_core.requests import EditRequest
from nas_core.settings import NASSettings, ValueSettings
from nas_core.spec import spec_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PilotNorms:
    """The pilots' ||v*|| (N,) in the pilots' order, and the torch thread counts they ran at."""

    norms: torch.Tensor
    threads: tuple[int, ...]


def pilot_norms(model: nn.Module, tok, pilots: Sequence[EditRequest], layer: int, values: ValueSettings,
                nas: NASSettings, runner: RunnerSettings = RunnerSettings(), ident: BaseIdent | None = None,
                progress: Callable[[int, int], None] | None = None) -> PilotNorms:
    """||v*|| of every pilot, optimised on ``runner``.

    ``model`` is the unedited base (the sequential runner optimises on it); the dask runner needs
    its identity ``ident`` instead. ``progress(done, total)`` is called as batches finish.
    """
    batches = pilot_batches(pilots, nas.pilot_batch_size)
    t0 = time.perf_counter()
    if runner.kind == "sequential":
        with unit_threads(runner.threads) as threads:
            norms = pilot_norms_here(model, tok, spec_for(model), pilots, layer, values, nas.pilot_batch_size,
                                     progress)
        result = PilotNorms(norms, (threads,))
    else:
        if ident is None:
            raise ValueError("pilots on the dask runner need the base model's identity")
        result = _on_dask(batches, layer, values, runner, ident, progress)
    log.info("optimised %d pilots in %d batches on the %s runner in %.1f s", len(pilots), len(batches),
             runner.kind, time.perf_counter() - t0)
    return result


def _on_dask(batches: list[Sequence[EditRequest]], layer: int, values: ValueSettings, runner: RunnerSettings,
             ident: BaseIdent, progress: Callable[[int, int], None] | None) -> PilotNorms:
    """Every batch a task on ``runner``'s cluster; the norms in the batches' order."""
    from distributed import as_completed

    total, done = sum(len(b) for b in batches), 0
    with dask_client(runner) as client:
        futures = [client.submit(batch_on_worker, ident, tuple(batch), layer, values, runner.threads, pure=False)
                   for batch in batches]
        index = {f.key: i for i, f in enumerate(futures)}
        results: dict[int, tuple[torch.Tensor, int]] = {}
        for future in as_completed(futures):
            i = index[future.key]
            results[i] = future.result()
            done += len(batches[i])
            if progress is not None:
                progress(done, total)
    return PilotNorms(torch.cat([results[i][0] for i in range(len(batches))]),
                      tuple(sorted({t for _, t in results.values()})))


#: One pilot batch at a time per process: v* hooks the process's one copy of the model, and the
#: torch thread count is the whole process's (a cluster at an address may run several tasks at once).
_LOCK = threading.Lock()


def batch_on_worker(ident: BaseIdent, batch: tuple[EditRequest, ...], layer: int, values: ValueSettings,
                    threads: int | None) -> tuple[torch.Tensor, int]:
    """One pilot batch's ||v*|| on this process's copy of the base model ``ident``, and the torch
    threads it ran at (a Dask task)."""
    with _LOCK, unit_threads(threads) as used:
        base = unit_base(ident)
        return batch_norms(base.model, base.tok, spec_for(base.model), batch, layer, values), used
