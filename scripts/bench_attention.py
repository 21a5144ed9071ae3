"""Interleaved A/B of the v* attention kernel on the bf16 path: 4 rounds x 10 stream requests each.

Usage: .venv/bin/python scripts/bench_attention.py   (docs/speed.md). The host's speed drifts
between runs, so the two kernels alternate within one process over the same requests.
"""

from __future__ import annotations

import dataclasses
import time

from flows.assets.load import load_model
from flows.config.model import config_for
from flows.config.params import load_params
from flows.engine import precision
from flows.studies import horizon
from nas_core.spec import spec_for
from nas_core.values import optimise_values


def main() -> None:
    model, tok = load_model("data/models/smollm2-135m")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = config_for("smollm2-135m")
    spec, layer = spec_for(model), cfg.method("alphaedit", True).layers[-1]
    base = dataclasses.replace(cfg.method("alphaedit", True).values, compute_dtype="bfloat16")
    reqs = horizon.stream_requests(load_params().roots.horizon_stream, 40)
    optimise_values(model, tok, spec, reqs[:10], layer, base)  # warm-up
    total = {"default": 0.0, "math": 0.0}
    print(precision.describe_machine())
    for rnd in range(4):
        for kernel in ("default", "math") if rnd % 2 == 0 else ("math", "default"):
            t = time.perf_counter()
            optimise_values(model, tok, spec, reqs[rnd * 10 : (rnd + 1) * 10], layer,
                            dataclasses.replace(base, attention=kernel))
            seconds = time.perf_counter() - t
            total[kernel] += seconds
            print(f"round {rnd} {kernel}: {seconds / 10:.3f} s/request", flush=True)
    print({k: round(v / 40, 3) for k, v in total.items()}, "s/request over the same 40 requests")


if __name__ == "__main__":
    main()
