"""Derive the gate's collapse thresholds from a horizon study's healthy and collapsed points.

Usage: python scripts/gate_from_horizon.py docs/results/horizon-long.json [--json]

A point is *collapsed* from the method's CP@60 on (editing score below 60 or canary perplexity
above 2x), *healthy* before it. For every method the script prints, and the reasoning in
docs/horizon.md and in the docstrings of ``nas_core.collapse.CollapseSettings`` and
``flows.config.params.PromotionParams`` follows from these numbers:

- the norm ratio where the canary perplexity crossed 2x (linear interpolation between the
  two measurements around the crossing): the norm bound that stops a lineage *before* it
  collapses sits just below the smallest of them;
- the steady norm growth per edit (the slope of a line through the healthy points): a
  night growing much faster than every steady rate is a blow-up, not a trend;
- the editing scores of the healthy and collapsed points: whether the score floor separates;
- the spread of the general-task drop over healthy points: the noise of a measurement with
  the study's items per task, and the items per task a 10-point bound needs to sit 3 standard
  deviations above it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from flows.studies.horizon_points import collapse_point


def norm_at_ppl(points: list[dict], ppl: float = 2.0) -> float | None:
    """Norm ratio where the perplexity ratio first reaches ``ppl`` (interpolated)."""
    for a, b in zip(points, points[1:], strict=False):
        pa, pb = a["metrics"]["perplexity_ratio"], b["metrics"]["perplexity_ratio"]
        if pa < ppl <= pb:
            na, nb = a["metrics"]["norm_ratio_max"], b["metrics"]["norm_ratio_max"]
            return na + (nb - na) * (ppl - pa) / (pb - pa)
    return None


def derive(methods: dict[str, list[dict]], items_per_task: int, tasks: int) -> dict:
    per_method, healthy_drops, healthy_es, collapsed_es, crossings, rates = {}, [], [], [], [], []
    for label, points in methods.items():
        cp = collapse_point(points)
        healthy = [p for p in points if cp is None or p["edits"] < cp]
        collapsed = [p for p in points if cp is not None and p["edits"] >= cp]
        xs = [p["edits"] for p in healthy]
        ys = [p["metrics"]["norm_ratio_max"] - 1 for p in healthy]
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs) if xs else None
        cross = norm_at_ppl(points)
        per_method[label] = {
            "edits": points[-1]["edits"] if points else 0, "cp60": cp, "norm_at_ppl_2x": cross,
            "steady_growth_per_edit": slope,
            "healthy_editing_score": [min((p["metrics"]["editing_score"] for p in healthy), default=None),
                                      max((p["metrics"]["editing_score"] for p in healthy), default=None)],
            "collapsed_editing_score": [min((p["metrics"]["editing_score"] for p in collapsed), default=None),
                                        max((p["metrics"]["editing_score"] for p in collapsed), default=None)],
        }
        healthy_drops += [p["metrics"]["general_drop"] for p in healthy if p["metrics"].get("general_drop") is not None]
        healthy_es += [p["metrics"]["editing_score"] for p in healthy]
        collapsed_es += [p["metrics"]["editing_score"] for p in collapsed]
        crossings += [cross] if cross is not None else []
        rates += [slope] if slope is not None else []
    sd = statistics.pstdev(healthy_drops) if len(healthy_drops) > 1 else None
    # The drop is a difference of two means over items * tasks items: its noise falls as 1/sqrt(items).
    items_for_3sd = math.ceil(items_per_task * (3 * sd / 10.0) ** 2) if sd else None
    return {
        "methods": per_method,
        "norm_ratio_at_ppl_2x": [min(crossings), max(crossings)] if crossings else None,
        "steady_growth_per_edit": [min(rates), max(rates)] if rates else None,
        "healthy_editing_score": [min(healthy_es), max(healthy_es)] if healthy_es else None,
        "collapsed_editing_score": [min(collapsed_es), max(collapsed_es)] if collapsed_es else None,
        "general_drop_healthy": {"mean": statistics.fmean(healthy_drops) if healthy_drops else None, "sd": sd,
                                 "items_per_task": items_per_task, "tasks": tasks,
                                 "items_per_task_for_a_10_point_bound_at_3_sd": items_for_3sd},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a horizon results JSON (scripts/horizon_report.py --out)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = json.loads(args.results.read_text(encoding="utf-8"))
    methods = {k: v["points"] for k, v in res["methods"].items() if v.get("points")}
    settings = res.get("settings", {})
    # The general tasks the points scored (``general.<task>`` metrics), not an assumed count.
    tasks = len({k for pts in methods.values() for p in pts for k in p["metrics"]
                 if k.startswith("general.")})
    out = derive(methods, int(settings.get("general_items", 10)), tasks)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'method':<16} {'edits':>6} {'CP@60':>6} {'norm at ppl 2x':>15} {'steady growth/edit':>19} "
          f"{'ES healthy':>12} {'ES collapsed':>13}")
    for label, m in out["methods"].items():
        def rng(v):
            return "-" if v[0] is None else f"{v[0]:.1f}-{v[1]:.1f}"
        cross = "-" if m["norm_at_ppl_2x"] is None else f"{m['norm_at_ppl_2x']:.3f}"
        rate = "-" if m["steady_growth_per_edit"] is None else f"{m['steady_growth_per_edit']:.2e}"
        print(f"{label:<16} {m['edits']:>6} {str(m['cp60'] or '-'):>6} {cross:>15} {rate:>19} "
              f"{rng(m['healthy_editing_score']):>12} {rng(m['collapsed_editing_score']):>13}")
    g = out["general_drop_healthy"]
    print(f"norm ratio where perplexity crossed 2x: {out['norm_ratio_at_ppl_2x']}")
    print(f"steady growth per edit: {out['steady_growth_per_edit']}")
    print(f"editing score healthy {out['healthy_editing_score']}, collapsed {out['collapsed_editing_score']}")
    if g["sd"] is not None:
        print(f"general drop over healthy points: mean {g['mean']:.1f}, sd {g['sd']:.1f} points with "
              f"{g['items_per_task']} items per task; a 10-point bound at 3 sd needs "
              f"{g['items_per_task_for_a_10_point_bound_at_3_sd']} items per task")


if __name__ == "__main__":
    main()
