"""Retention scoring of N facts unsharded vs in shards on a local Dask cluster, side by side in one run.

Usage: python scripts/bench_sharded_retention.py [N] [WORKERS] [SHARDS ...] — the first N requests
of the horizon stream (CounterFact, paraphrases and neighbourhoods) scored on SmolLM2-135M whose
edited layers were moved at random (the scoring cost does not depend on the weights' values):

* unsharded in this process at its default torch threads (what ``dvc repro`` did), then at 1 thread;
* on a new local cluster of WORKERS processes (1 torch thread each), once per shard count, the
  first count cold (cluster start and each worker's model load included) and again warm.

Prints the machine, each wall time, and whether each sharded result equals the unsharded ones
(every edit metric, exactly).
"""

from __future__ import annotations

import sys
import time

import torch

from flows.config.params import load_params
from flows.config.runner import RunnerSettings
from flows.engine import precision
from flows.engine.shards import ShardedScorer
from flows.engine.workers import dask_client, driver_base, unit_threads
from flows.studies.horizon import stream_requests
from nas_core.evaluate.counterfact import edit_metrics
from nas_core.spec import spec_for


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    counts = [int(a) for a in sys.argv[3:]] or [workers, 4 * workers]
    params = load_params()
    cfg = params.model_config()
    ident, base = driver_base(cfg.model, params)
    model, tok = base.model, base.tok
    names = tuple(spec_for(model).weight_name(layer) for layer in cfg.all_layers())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            w = model.get_parameter(name)
            w.add_(0.01 * w.std() * torch.randn(w.shape, generator=gen))
    reqs = stream_requests(params.roots.horizon_stream, n)
    pairs = sum(1 + len(r.paraphrase_prompts) + len(r.neighbourhood_prompts) for r in reqs)
    print(precision.describe_machine(), flush=True)
    print(f"{n} requests, {pairs} comparisons ({2 * pairs} scored pairs), batch {cfg.eval.batch_size} rows / "
          f"{cfg.eval.batch_tokens} tokens; {workers} Dask workers x 1 torch thread", flush=True)
    t0 = time.perf_counter()
    here = edit_metrics(model, tok, reqs, cfg.eval.batch_size, cfg.eval.batch_tokens)
    print(f"unsharded, this process, {torch.get_num_threads()} threads: {time.perf_counter() - t0:7.1f} s  "
          f"(editing score {here.editing_score:.2f})", flush=True)
    t0 = time.perf_counter()
    with unit_threads(1):
        one = edit_metrics(model, tok, reqs, cfg.eval.batch_size, cfg.eval.batch_tokens)
    print(f"unsharded, this process, 1 thread:  {time.perf_counter() - t0:7.1f} s  "
          f"(equals the {torch.get_num_threads()}-thread result: {one == here})", flush=True)
    runner = RunnerSettings("dask", workers=workers, threads=1)
    t0 = time.perf_counter()
    with dask_client(runner) as client:
        print(f"local cluster of {workers} workers started in {time.perf_counter() - t0:.1f} s", flush=True)
        at = RunnerSettings("dask", address=client.scheduler.address, threads=1)
        for i, shards in enumerate([counts[0], *counts]):
            t0 = time.perf_counter()
            got = edit_metrics(model, tok, reqs, cfg.eval.batch_size, cfg.eval.batch_tokens,
                               scorer=ShardedScorer(shards, at, ident, names))
            label = "cold (model loads)" if i == 0 else "warm"
            print(f"{shards:3d} shards on {workers} workers, {label:18s}: {time.perf_counter() - t0:7.1f} s  "
                  f"(equals 1 thread: {got == one}; equals {torch.get_num_threads()} threads: {got == here})",
                  flush=True)


if __name__ == "__main__":
    main()
