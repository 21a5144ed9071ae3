"""The Fall-of-ROME study: single edits from the base model that blow the model up.

"The Fall of ROME" (arXiv 2406.11263) traces ROME's single-edit collapses to the key in the
update's denominator: classic ROME computes it on the unprefixed prompt while the rest of the
update uses the prefix-averaged key, and where the subject is the prompt's first token the two
differ most. This study edits each case alone from the base model with every method given and
calls an edit a blow-up when the canary perplexity more than doubles or the update's norm is
more than ``norm_factor`` times the method's median; it counts blow-ups separately for cases
whose subject is the first token of the prompt and for ordinary ones.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from flows.engine import editing, evaluation, precision
from flows.paths import Roots
from nas_core.evaluate.health import perplexity
from nas_core.requests import EditRequest
from nas_core.settings import EvalSettings


@dataclass(frozen=True)
class FallSettings:
    """The study's shape.

    Attributes:
        cases: cases of each kind (subject first / ordinary), the first found in the file.
        ppl_factor: a canary perplexity above this times the base model's is a blow-up.
        norm_factor: an update norm above this times the method's median is a blow-up.
        canary_tokens: canary tokens scored after each edit.
    """

    cases: int = 20
    ppl_factor: float = 2.0
    norm_factor: float = 10.0
    canary_tokens: int = 512


def split_cases(requests: list[EditRequest], n: int) -> dict[str, list[EditRequest]]:
    """The first ``n`` cases whose template starts with the subject, and the first ``n`` others."""
    first = [r for r in requests if r.prompt.startswith("{}")][:n]
    ordinary = [r for r in requests if not r.prompt.startswith("{}")][:n]
    return {"subject_first": first, "ordinary": ordinary}


def edit_alone(session: editing.EditSession, req: EditRequest, canary: list[int], window: int) -> dict[str, Any]:
    """One edit from the base model: the update's norm, the canary perplexity, then undo."""
    start = session.snapshot()  # the base model: every edit is undone in the finally
    t0 = time.perf_counter()
    try:
        result = session.apply([req])
        norm = sum(float(d.double().norm() ** 2) for d in result.deltas.values()) ** 0.5
        ppl = perplexity(session.model, canary, window=window)
        error = None
    except ArithmeticError as err:  # r-ROME refuses a non-positive denominator
        norm, ppl, error = float("nan"), float("nan"), str(err)
    finally:
        session.restore(start)
    return {"case_id": req.case_id, "update_norm": norm, "perplexity": ppl, "error": error,
            "seconds": round(time.perf_counter() - t0, 2)}


def verdicts(rows: list[dict[str, Any]], base_ppl: float, s: FallSettings) -> list[dict[str, Any]]:
    """Each row with ``blown_up`` (and why) against the method's median update norm."""
    norms = [r["update_norm"] for r in rows if r["error"] is None and math.isfinite(r["update_norm"])]
    median = statistics.median(norms) if norms else float("nan")
    out = []
    for r in rows:
        why = []
        if r["error"] is not None:
            why.append("refused")
        elif not (math.isfinite(r["perplexity"]) and math.isfinite(r["update_norm"])):
            why.append("non-finite perplexity or update")  # a NaN model is the worst blow-up
        else:
            if r["perplexity"] > s.ppl_factor * base_ppl:
                why.append(f"ppl x{r['perplexity'] / base_ppl:.1f}")
            if r["update_norm"] > s.norm_factor * median:
                why.append(f"norm x{r['update_norm'] / median:.1f} median")
        out.append({**r, "blown_up": bool(why) and why != ["refused"], "why": why})
    return out


def summary(rows_by_kind: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per kind of case: edits, blow-ups and their share."""
    return {kind: {"edits": len(rows), "blown_up": sum(r["blown_up"] for r in rows),
                   "refused": sum(r["error"] is not None for r in rows),
                   "share": sum(r["blown_up"] for r in rows) / len(rows) if rows else None}
            for kind, rows in rows_by_kind.items()}


def regroup(flat: list[dict[str, Any]], rows_by_kind: dict[str, list]) -> dict[str, list[dict[str, Any]]]:
    """``flat`` (the rows of every kind, in order, as :func:`verdicts` judged them together) back
    under their kinds."""
    judged, i = {}, 0
    for kind, rows in rows_by_kind.items():
        judged[kind], i = flat[i : i + len(rows)], i + len(rows)
    return judged


def document(kinds: dict[str, list[EditRequest]], s: FallSettings) -> dict[str, Any]:
    """The study's JSON before any method: its settings, the cases of each kind, the machine."""
    return {"settings": dataclasses.asdict(s), "cases": {k: [r.case_id for r in v] for k, v in kinds.items()},
            "methods": {}, **precision.cpu_facts()}


@dataclass(frozen=True)
class MethodFall:
    """One method's part of the study: the base model's canary perplexity, the blow-ups per kind
    of case (:func:`summary`) and every edit's verdict."""

    base_perplexity: float
    summary: dict[str, Any]
    edits: dict[str, list[dict[str, Any]]]
    compute_dtype: str

    def record(self) -> dict[str, Any]:
        """The method's entry under ``methods`` in the study's JSON."""
        return {"base_perplexity": self.base_perplexity, "summary": self.summary, "edits": self.edits,
                "compute_dtype": self.compute_dtype}


def fall_of_method(session: editing.EditSession, kinds: dict[str, list[EditRequest]], eval_settings: EvalSettings,
                   roots: Roots, s: FallSettings) -> MethodFall:
    """Every case edited alone with ``session``'s method, judged against the method's median update
    norm over all kinds together and the base model's canary perplexity."""
    canary, _ = evaluation.canary_ids(session.tok, dataclasses.replace(eval_settings, canary_tokens=s.canary_tokens),
                                      roots)
    window = eval_settings.canary_window
    base_ppl = perplexity(session.model, canary, window=window)
    rows = {k: [edit_alone(session, r, canary, window) for r in v] for k, v in kinds.items()}
    judged = regroup(verdicts([r for v in rows.values() for r in v], base_ppl, s), rows)
    return MethodFall(base_ppl, summary(judged), judged, session.compute_dtype)


__all__ = ["FallSettings", "MethodFall", "document", "edit_alone", "fall_of_method", "regroup", "split_cases",
           "summary", "verdicts"]
