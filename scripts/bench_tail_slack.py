"""v* seconds per request by ``values.tail_group_slack``, interleaved in one process.

Usage: python scripts/bench_tail_slack.py [BATCH] [ROUNDS] — batches of BATCH requests (10 as
the horizon study edits) from the horizon stream, each batch optimised once per slack in a
rotating order, so host drift hits every setting alike. Prints the machine, the groups per
batch, and the mean seconds per request for each slack.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from flows.assets.load import load_model
from flows.config.params import load_params
from flows.engine import precision
from flows.studies.horizon import stream_requests
from nas_core.spec import spec_for
from nas_core.values import optimise_values, tail_groups, tail_width

SLACKS = (0, 1, 2, 4, 100)


def main() -> None:
    batch, rounds = (int(sys.argv[1]) if len(sys.argv) > 1 else 10), (int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    params = load_params()
    model, tok = load_model(params.roots.models / "smollm2-135m")
    for p in model.parameters():
        p.requires_grad_(False)
    s = precision.resolve(params.model_config().method("alphaedit", True), next(model.parameters()).device)
    spec, layer = spec_for(model), s.layers[-1]
    reqs = stream_requests(params.roots.horizon_stream, batch * (rounds + 1))
    print(precision.describe(s), f"attention {s.values.attention}; batch {batch}, {rounds} rounds", flush=True)
    optimise_values(model, tok, spec, reqs[:batch], layer, s.values)  # warm-up
    total = dict.fromkeys(SLACKS, 0.0)
    for rnd in range(rounds):
        part = reqs[(rnd + 1) * batch : (rnd + 2) * batch]
        widths = [tail_width(tok, r, s.values) for r in part]
        order = SLACKS[rnd % len(SLACKS):] + SLACKS[: rnd % len(SLACKS)]
        for slack in order:
            t = time.perf_counter()
            optimise_values(model, tok, spec, part, layer, dataclasses.replace(s.values, tail_group_slack=slack))
            total[slack] += time.perf_counter() - t
        print(f"round {rnd}: widths {sorted(widths)}; groups by slack "
              f"{ {k: len(tail_groups(widths, k)) for k in SLACKS} }", flush=True)
    print({k: round(v / (rounds * batch), 3) for k, v in total.items()}, "s/request by tail_group_slack")


if __name__ == "__main__":
    main()
