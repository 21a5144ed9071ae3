"""Gather a (running or finished) horizon study's per-method points into one JSON and a table.

Usage: python scripts/horizon_report.py STUDY_DIR [--out docs/results/horizon-long.json]

Each method folder of the study holds ``points.json`` (written after every measurement), so
this can be run while the study is still going; every point carries the commit and the
machine it was measured on. The table gives, per method: edits reached, collapse point
(editing score below 60 or perplexity above 2x), the last point's scores, the norm-ratio
growth per edit and whether a line or an exponential fits the norm-ratio excess better.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from flows.studies.horizon_points import collapse_point, verdict_point


def verdict_checks(points: list[dict]) -> tuple[int | None, list[str]]:
    """The product's collapse verdict (:func:`verdict_point`) and the checks that failed there."""
    at = verdict_point(points)
    return at, next((p["failed_checks"] for p in points if p["edits"] == at), [])


def fit(points: list[dict]) -> dict[str, float | str | None]:
    """Least-squares fits of the norm-ratio excess r - 1 against edits: linear through 0, and
    log-linear (exponential); the one with the smaller squared error in r wins."""
    xs = [p["edits"] for p in points if p["metrics"].get("norm_ratio_max")]
    ys = [p["metrics"]["norm_ratio_max"] - 1 for p in points if p["metrics"].get("norm_ratio_max")]
    if len(xs) < 3 or min(ys) <= 0:
        return {"slope_per_edit": ys[-1] / xs[-1] if xs else None, "better_fit": None}
    slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    lin_err = sum((y - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    n, lx, ly = len(xs), sum(xs) / len(xs), sum(math.log(y) for y in ys) / len(ys)
    b = sum((x - lx) * (math.log(y) - ly) for x, y in zip(xs, ys, strict=True)) / sum((x - lx) ** 2 for x in xs)
    a = ly - b * lx
    exp_err = sum((y - math.exp(a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope_per_edit": slope, "exp_rate_per_edit": b, "linear_sse": lin_err, "exponential_sse": exp_err,
            "better_fit": "linear" if lin_err <= exp_err else "exponential", "points": n}


#: (metric key or point key, title, format) of the series tables of --markdown.
SERIES = (
    ("editing_score", "editing score (retention sample)", "{:.1f}"),
    ("perplexity_ratio", "canary perplexity / base", "{:.2f}"),
    ("norm_ratio_max", "max ||W||/||W0||", "{:.3f}"),
    ("v_norm_before_mean", "mean ||v*|| before NAS since the previous point", "{:.1f}"),
    ("general_drop", "general-task drop (points)", "{:.1f}"),
)


def markdown_series(methods: dict[str, dict]) -> str:
    """One markdown table per series: a row per measured edit count, a column per method."""
    out = []
    for key, title, fmt in SERIES:
        edits = sorted({p["edits"] for doc in methods.values() for p in doc["points"]})
        out += [f"{title}:", "", "| edits | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for e in edits:
            cells = []
            for doc in methods.values():
                p = next((q for q in doc["points"] if q["edits"] == e), None)
                v = None if p is None else p["metrics"].get(key, p.get(key))
                cells.append("" if v is None else fmt.format(v))
            out.append(f"| {e} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None, help="also draw horizon.png here")
    ap.add_argument("--markdown", action="store_true", help="also print the series tables in markdown")
    args = ap.parse_args()
    methods = {}
    for f in sorted(args.study.glob("*/points.json")):
        doc = json.loads(f.read_text(encoding="utf-8"))
        doc["norm_fit"] = fit(doc["points"])
        doc["cp60"] = collapse_point(doc["points"])
        doc["verdict_collapse"], doc["verdict_failed_checks"] = verdict_checks(doc["points"])
        methods[doc["method"]] = doc
    report = {"study": args.study.name, "methods": methods}
    if args.png and methods:
        from flows.studies.horizon_points import plot

        first = next(iter(methods.values()))["points"]
        edits = max(p["edits"] for doc in methods.values() for p in doc["points"])
        plot({"model": args.study.name.rsplit("-", 1)[0], "settings": {"stream_length": edits,
              "batch_size": first[0].get("batch_size", 10)},
              "base_point": {"norm_ratio_max": 1.0, "perplexity_ratio": 1.0},
              "methods": {k: {**v, "collapse_point": v["cp60"]} for k, v in methods.items()}}, args.png)  # x = CP@60
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    head = (f"{'method':18s} {'edits':>6s} {'CP@60':>7s} {'verdict':>8s} {'score':>6s} {'ES/PS/NS':>17s} {'ppl':>6s} "
            f"{'norm':>7s} {'growth/edit':>11s} {'fit':>11s} {'||v*||':>7s} {'s/edit':>6s}")
    print(head)
    for label, doc in methods.items():
        last = doc["points"][-1]
        m = last["metrics"]

        def f(key, fmt="{:.1f}", m=m):
            return "-" if m.get(key) is None else fmt.format(m[key])

        cp, vp = doc["cp60"], doc["verdict_collapse"]
        slope = doc["norm_fit"].get("slope_per_edit")
        print(f"{label:18s} {last['edits']:6d} {str(cp) if cp else 'none':>7s} {str(vp) if vp else 'none':>8s} "
              f"{f('editing_score'):>6s} "
              f"{f('efficacy_success') + '/' + f('generalisation_success') + '/' + f('specificity_success'):>17s} "
              f"{f('perplexity_ratio', '{:.2f}'):>6s} {f('norm_ratio_max', '{:.3f}'):>7s} "
              f"{'-' if slope is None else f'{slope:.2e}':>11s} {str(doc['norm_fit'].get('better_fit')):>11s} "
              f"{last.get('v_norm_before_mean') or '-':>7} {last['seconds_per_edit']:6.2f}")
        if vp:
            print(f"{'':18s} verdict at {vp}: {', '.join(doc['verdict_failed_checks'])}")
        machines = {(p.get("machine"), p.get("code_version")) for p in doc["points"]}
        print(f"{'':18s} measured on: {'; '.join(f'{mach} @ {str(code)[:12]}' for mach, code in machines)}")
    if args.markdown:
        print()
        print(markdown_series(methods))


if __name__ == "__main__":
    main()
