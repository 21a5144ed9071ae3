"""NAS pilots: v* seconds per pilot by ``nas.pilot_batch_size`` (and tail-group slack), interleaved.

Usage: python scripts/bench_pilot_batch.py [PILOTS] [ROUNDS] [SIZE:SLACK ...] — PILOTS seeded
pilot requests (the anchor's own sample) optimised once per setting per round, settings in a
rotating order so host drift hits each alike (default settings: 25:2 as configured, 50:2, 50:4,
100:4). Prints the machine, the seconds per pilot of each setting, and the largest relative
difference of any pilot's ||v*|| against the configured setting (the rounding of another batch shape).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from flows.assets.load import load_model
from flows.config.params import load_params
from flows.engine import precision
from flows.engine.caches import pilot_requests
from nas_core.spec import spec_for
from nas_core.values import optimise_values


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    settings = [tuple(int(x) for x in a.split(":")) for a in sys.argv[3:]] or [(25, 2), (50, 2), (50, 4), (100, 4)]
    params = load_params()
    model, tok = load_model(params.roots.models / "smollm2-135m")
    for p in model.parameters():
        p.requires_grad_(False)
    s = precision.resolve(params.model_config().method("alphaedit", True), next(model.parameters()).device)
    spec, layer = spec_for(model), s.layers[-1]
    pilots = pilot_requests(n, s.nas.seed, params.roots)
    print(precision.describe(s), f"attention {s.values.attention}; {n} pilots, {rounds} rounds", flush=True)
    optimise_values(model, tok, spec, pilots[:5], layer, s.values)  # warm-up
    total = dict.fromkeys(settings, 0.0)
    norms: dict[tuple[int, int], torch.Tensor] = {}
    for rnd in range(rounds):
        for size, slack in settings[rnd % len(settings):] + settings[: rnd % len(settings)]:
            values = dataclasses.replace(s.values, tail_group_slack=slack)
            t0, out = time.perf_counter(), []
            for start in range(0, n, size):
                chunk = pilots[start : start + size]
                out.append(optimise_values(model, tok, spec, chunk, layer, values).v_star.norm(dim=1))
            total[(size, slack)] += time.perf_counter() - t0
            norms[(size, slack)] = torch.cat(out)
        print(f"round {rnd}: " + ", ".join(f"{k[0]}:{k[1]} {v / (rnd + 1) / n:.3f}" for k, v in total.items()),
              flush=True)
    ref = norms[settings[0]]
    for k in settings:
        diff = float(((norms[k] - ref).abs() / ref).max())
        print(f"pilot_batch_size {k[0]:3d}, slack {k[1]}: {total[k] / (rounds * n):.3f} s/pilot; "
              f"max |d||v*||| / ||v*|| vs {settings[0][0]}:{settings[0][1]} = {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
