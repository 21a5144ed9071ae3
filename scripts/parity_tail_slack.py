"""Edit quality by ``values.tail_group_slack``: the first N counterfact_500 cases in sequential
batches of B with AlphaEdit+NAS, each slack from the same base weights; efficacy and paraphrase wins.

Usage: python scripts/parity_tail_slack.py [N] [B] [PILOTS]
"""

from __future__ import annotations

import dataclasses
import sys
import time

from flows.config.params import load_params
from flows.engine import precision
from flows.engine.base import load_base
from flows.engine.editing import apply_in_batches, open_session
from flows.engine.loading import base_anchor, base_stats
from flows.studies import bench


def main() -> None:
    args = [int(a) for a in sys.argv[1:4]]
    n, batch, pilots = args + [20, 10, 30][len(args):]
    params = load_params()
    base = load_base(params)
    s = precision.resolve(params.method_settings(), next(base.model.parameters()).device)
    s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=pilots))
    cov = base_stats(base, params)
    reqs = bench.counterfact_cases(params.roots, n)
    print(precision.describe(s), f"attention {s.values.attention}; {n} cases in batches of {batch}", flush=True)
    for slack in (0, 2):
        sk = precision.with_path(s, s.values.compute_dtype, s.values.attention, slack)
        session = open_session(base.model, base.tok, base.name, "alphaedit", sk, cov, base.base_hash,
                               base_anchor(base, params, sk))
        start = session.snapshot()
        t = time.perf_counter()
        apply_in_batches(session, reqs, batch)
        seconds = time.perf_counter() - t
        r = bench.efficacy(base.model, base.tok, reqs)
        print(f"slack {slack}: efficacy {sum(r['efficacy'])}/{n}, paraphrase {sum(r['paraphrase'])}/{n}, "
              f"{seconds / n:.2f} s/edit", flush=True)
        session.restore(start)


if __name__ == "__main__":
    main()
