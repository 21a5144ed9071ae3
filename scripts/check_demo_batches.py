"""Check the demo nightly fact batches: schema problems, and whether the model knows each fact.

Every batch is parsed with :func:`nas_core.formats.parse_fact_jsonl`.  Each valid request is
scored with teacher-forced mean token NLL (:func:`nas_core.evaluate.scoring.target_nll`) in one
batched pass over all files.  A fact is *known* when, on the filled prompt, NLL(target_true) <
NLL(target_new) (the model prefers the true answer today) and, on every neighbourhood prompt,
NLL(its target) < NLL(the record's target_new).  The *margin* is NLL(target_new) -
NLL(target_true); a known fact with a margin below ``--min-margin`` is counted as weak (reported,
not an error).  A *conflict* is a valid record with the same subject and relation (relation_id,
else prompt template) as a record of an earlier file, or earlier in the same file, but another
target_new.

Batches named with ``--broken`` (default: ``night-03.jsonl``, the deliberately broken demo
batch) are only reported.  The exit status is 1 when any other batch has a parse problem, a
conflict or a fact the model does not know.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/check_demo_batches.py [FILE ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nas_core.formats import ConversionReport, parse_fact_jsonl
from nas_core.requests import EditRequest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "data" / "demo" / "batches"
DEFAULT_MODEL = ROOT / "data" / "models" / "smollm2-135m"


@dataclass
class FactScore:
    """Scores of one valid request."""

    request: EditRequest
    margin: float  # NLL(target_new) - NLL(target_true) on the filled prompt
    neighbour_margins: list[float]  # NLL(target_new) - NLL(neighbour target), per neighbour

    @property
    def known(self) -> bool:
        return self.margin > 0 and all(m > 0 for m in self.neighbour_margins)


@dataclass
class BatchResult:
    """Everything checked about one batch file."""

    path: Path
    report: ConversionReport
    broken: bool
    scores: list[FactScore] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def unknown(self) -> list[FactScore]:
        return [s for s in self.scores if not s.known]

    @property
    def failed(self) -> bool:
        return not self.broken and bool(self.report.problems or self.conflicts or self.unknown)


def score_requests(model_path: Path, requests: list[EditRequest]) -> list[FactScore]:
    """Score every request (and its neighbourhood prompts) in one batched model pass."""
    from flows.assets.load import load_model
    from nas_core.evaluate.scoring import target_nll

    prompts: list[str] = []
    targets: list[str] = []
    for r in requests:
        prompts += [r.filled_prompt, r.filled_prompt]
        targets += [r.target_true, r.target_new]
        for n in r.neighbourhood_prompts:
            prompts += [n.prompt, n.prompt]
            targets += [n.target, r.target_new]
    if not prompts:
        return []
    model, tok = load_model(model_path)
    nll = target_nll(model, tok, prompts, targets).tolist()
    scores, i = [], 0
    for r in requests:
        margin = nll[i + 1] - nll[i]
        i += 2
        neighbour_margins = []
        for _ in r.neighbourhood_prompts:
            neighbour_margins.append(nll[i + 1] - nll[i])
            i += 2
        scores.append(FactScore(r, margin, neighbour_margins))
    return scores


def find_conflicts(results: list[BatchResult]) -> None:
    """Fill ``conflicts``: same subject and relation as an earlier valid record, other target_new."""
    seen: dict[tuple[str, str], tuple[str, EditRequest]] = {}
    for res in results:
        for r in res.report.requests:
            key = (r.subject.casefold(), r.relation_id or r.prompt)
            if key in seen:
                where, first = seen[key]
                if first.target_new.casefold() != r.target_new.casefold():
                    res.conflicts.append(
                        f"{r.case_id} ({r.subject!r} -> {r.target_new!r}) conflicts with {where}:"
                        f"{first.case_id} (-> {first.target_new!r})"
                    )
            else:
                seen[key] = (res.path.name, r)


def table(results: list[BatchResult], min_margin: float) -> list[str]:
    """The per-file summary table, one string per line."""
    head = ("file", "kind", "lines", "valid", "problems", "known", "weak", "margin min/median/mean", "nb min",
            "conflicts")
    rows = [head]
    for res in results:
        margins = [s.margin for s in res.scores]
        nb = [m for s in res.scores for m in s.neighbour_margins]
        known = sum(s.known for s in res.scores)
        weak = sum(s.known and s.margin < min_margin for s in res.scores)
        stats = "-"
        if margins:
            stats = f"{min(margins):.2f} / {statistics.median(margins):.2f} / {statistics.mean(margins):.2f}"
        rows.append((
            res.path.name,
            "broken" if res.broken else "good",
            str(res.report.n_total),
            str(len(res.report.requests)),
            str(len(res.report.problems)),
            f"{known}/{len(res.scores)}",
            str(weak),
            stats,
            f"{min(nb):.2f}" if nb else "-",
            str(len(res.conflicts)),
        ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def details(res: BatchResult) -> list[str]:
    """Lines describing what is wrong in one batch (empty when nothing is)."""
    lines = [f"  line {p.position + 1}: {p.case_id or '-'}: [{p.rule}] {p.message}" for p in res.report.problems]
    for s in res.unknown:
        r = s.request
        nb = ", ".join(f"{m:+.2f}" for m in s.neighbour_margins)
        lines.append(f"  not known: {r.case_id}: margin {s.margin:+.2f}, neighbour margins [{nb}]")
    lines += [f"  conflict: {c}" for c in res.conflicts]
    return [f"{res.path.name}:", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="batch files (default: data/demo/batches/*.jsonl)")
    parser.add_argument("--broken", action="append", help="file name of a deliberately broken batch (repeatable)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fp32 safetensors model folder")
    parser.add_argument("--min-margin", type=float, default=0.5, help="margin below which a known fact is weak")
    args = parser.parse_args(argv)

    files = args.files or sorted(DEFAULT_DIR.glob("*.jsonl"))
    broken = set(args.broken or ["night-03.jsonl"])
    results = [BatchResult(f, parse_fact_jsonl(f.read_text(encoding="utf-8")), f.name in broken) for f in files]
    find_conflicts(results)
    scores = iter(score_requests(args.model, [r for res in results for r in res.report.requests]))
    for res in results:
        res.scores = [next(scores) for _ in res.report.requests]

    out = table(results, args.min_margin)
    for res in results:
        out += details(res)
    failed = [res.path.name for res in results if res.failed]
    out.append(f"FAILED: {', '.join(failed)}" if failed else "OK: every good batch parses cleanly and is known")
    print("\n".join(out))  # noqa: T201
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
