"""NAS pilots: seconds per pilot here (all torch threads) against a local Dask cluster, side by side.

Usage: python scripts/bench_pilot_runner.py [PILOTS] [ROUNDS] [WORKERS] — the anchor's own seeded
pilot sample, optimised ROUNDS times on each runner in alternating order so host drift hits both
alike: sequential at the process's threads, and dask on WORKERS one-thread workers (the cluster
started once, its start and every worker's model load timed apart). Prints the machine, the
seconds per pilot of each runner and how far the norms and the anchor a differ (the last bits
depend on the torch threads).
"""

from __future__ import annotations

import sys
import time

import torch

from flows.config.params import load_params
from flows.config.runner import RunnerSettings
from flows.engine import precision
from flows.engine.base import load_base
from flows.engine.caches import pilot_requests
from flows.engine.pilots import pilot_norms
from flows.engine.workers import dask_client, ident_for
from nas_core.anchor import reference_norm_from


def _load_base(ident) -> str:
    from flows.engine.workers import unit_base

    return unit_base(ident).base_hash


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    params = load_params()
    base = load_base(params)
    s = precision.resolve(params.model_config().method("alphaedit", True), next(base.model.parameters()).device)
    ident = ident_for(params.model_config().model, params, base.base_hash)
    pilots = pilot_requests(n, s.nas.seed, params.roots)
    print(precision.describe(s), f"attention {s.values.attention}; {n} pilots, batch {s.nas.pilot_batch_size}, "
          f"{rounds} rounds; here {torch.get_num_threads()} threads, dask {workers} x 1 thread", flush=True)
    t0 = time.perf_counter()
    with dask_client(RunnerSettings("dask", workers=workers, threads=1)) as client:
        runner = RunnerSettings("dask", address=client.scheduler.address, threads=1)
        loaded = client.run(_load_base, ident)  # every worker loads its copy before the timed rounds
        print(f"cluster start and {len(loaded)} workers' model loads: {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {"sequential": RunnerSettings(), "dask": runner}
        total, norms = dict.fromkeys(runs, 0.0), {}
        for rnd in range(rounds):
            for name in list(runs)[rnd % 2:] + list(runs)[: rnd % 2]:
                t1 = time.perf_counter()
                norms[name] = pilot_norms(base.model, base.tok, pilots, s.layers[-1], s.values, s.nas,
                                          runs[name], ident).norms
                total[name] += time.perf_counter() - t1
                print(f"round {rnd} {name}: {(time.perf_counter() - t1) / n:.3f} s/pilot", flush=True)
    drop = s.nas.drop_top_fraction
    a = {k: reference_norm_from(v, drop).reference_norm for k, v in norms.items()}
    diff = float(((norms["dask"] - norms["sequential"]).abs() / norms["sequential"]).max())
    for name in runs:
        print(f"{name:10s}: {total[name] / (rounds * n):.3f} s/pilot, a = {a[name]:.4f}", flush=True)
    print(f"dask / sequential: {total['dask'] / total['sequential']:.3f}; max |d||v*||| / ||v*|| = {diff:.2e}",
          flush=True)


if __name__ == "__main__":
    main()
