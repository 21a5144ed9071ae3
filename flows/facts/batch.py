"""A fact batch's id and the outcome of validating it (:class:`BatchValidation`).

A batch is one ``.jsonl`` file; its id is the file stem and names its quarantine folder, so it
must be one harmless path component (:func:`batch_id_for`). :class:`BatchValidation` holds
every problem found, the accepted requests and the GX outcomes, and renders itself as the
one-paragraph summary and the JSON account that reports and ``nas validate`` show.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.gx_suite import SUITE_NAME, ExpectationOutcome
from flows.ledger.facts import LedgerFact
from nas_core.formats import RecordProblem
from nas_core.requests import EditRequest

#: A batch id (the file stem): a letter or digit, then up to 63 of ``A-Z a-z 0-9 . _ -``.
#: It names the batch's quarantine folder, so it must be one harmless path component.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The whole file name (stem plus suffix) may only use the same characters.
_FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class BatchNameError(ValueError):
    """A batch file name is not a valid batch id; the message names the file and the rule."""


def batch_id_for(path: Path | str) -> str:
    """The batch id of a batch file: its stem, e.g. ``"2025-01-31"`` for ``inbox/2025-01-31.jsonl``.

    Only the file name counts (the folders are where the file lies, not part of its id). The
    stem must match :data:`BATCH_ID_PATTERN` and the whole name may only use the same
    characters, so the id is always one harmless path component: no ``..``, no slash or
    backslash, no space, no control character, no hidden-file dot.

    Raises:
        BatchNameError: naming the file and the rule it breaks.
    """
    path = Path(path)
    name, stem = path.name, path.stem
    if not BATCH_ID_PATTERN.fullmatch(stem) or not _FILE_NAME_PATTERN.fullmatch(name):
        raise BatchNameError(
            f"batch file {name!r} (in {str(path.parent)!r}): the name must match "
            f"{_FILE_NAME_PATTERN.pattern} and its stem {BATCH_ID_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit; stem at most 64 characters)"
        )
    return stem


def fallback_batch_id(sha256: str) -> str:
    """The safe id of a batch whose file name is not a valid batch id (from its content's hash)."""
    return f"invalid-name-{sha256[:8]}"


def _problem_dict(problem: RecordProblem) -> dict[str, Any]:
    return {
        "position": problem.position,
        "line": problem.position + 1 if problem.position >= 0 else None,
        "case_id": problem.case_id,
        "rule": problem.rule,
        "severity": problem.severity,
        "field": problem.field,
        "message": problem.message,
    }


def _count(problems: Sequence[RecordProblem], omitted: Mapping[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.rule] = counts.get(problem.rule, 0) + 1
    for rule in counts:
        counts[rule] += omitted.get(rule, 0)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _where(problem: RecordProblem) -> str:
    if problem.position < 0:
        return "batch"
    return f"line {problem.position + 1}" + (f" (case {problem.case_id!r})" if problem.case_id else "")


@dataclass(frozen=True)
class BatchValidation:
    """The outcome of :func:`flows.facts.validate.validate_batch` for one batch file.

    Attributes:
        batch_id: the file stem (:func:`batch_id_for`), or ``invalid-name-<sha8>`` when the
            name is not a valid batch id (then a problem says so).
        path: the file that was validated.
        sha256: hex digest of the bytes validated (the night's snapshot of the file).
        n_records: non-blank lines (each is one record, valid or not).
        passed: True when no problem refuses a record or the batch (warnings do not).
        problems: every refusing problem, ordered by position (batch-level ones first), at
            most ``settings.max_problems_per_rule`` of each rule (see ``omitted``).
        requests: the accepted requests in file order; empty when the batch failed.
        superseded: ledger facts this batch overrides (policy ``"supersede"``); empty when
            the batch failed, since a failed batch applies nothing.
        expectations: the outcome of every expectation of the GX suite (empty when the file
            could not be read as text, e.g. too large).
        settings: the settings used.
    """

    batch_id: str
    path: Path
    sha256: str
    n_records: int
    passed: bool
    problems: tuple[RecordProblem, ...]
    requests: tuple[EditRequest, ...]
    superseded: tuple[LedgerFact, ...]
    expectations: tuple[ExpectationOutcome, ...]
    settings: ValidationSettings = ValidationSettings()
    warnings: tuple[RecordProblem, ...] = ()
    omitted: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    link_target: str | None = None

    @property
    def failed_positions(self) -> tuple[int, ...]:
        """Positions of the records with at least one problem (batch-level excluded)."""
        return tuple(sorted({p.position for p in self.problems if p.position >= 0}))

    def problems_by_rule(self) -> dict[str, int]:
        """Number of refusing problems per rule (omitted ones included), the most frequent first."""
        return _count(self.problems, self.omitted)

    def warnings_by_rule(self) -> dict[str, int]:
        """Number of warnings per rule (omitted ones included), the most frequent first."""
        return _count(self.warnings, self.omitted)

    def summary(self, max_examples: int = 3) -> str:
        """One readable paragraph: verdict, counts, failing expectations, first problems."""
        head = f"Batch {self.batch_id!r} ({self.n_records} records, sha256 {self.sha256[:12]}):"
        if self.passed:
            text = f"{head} PASSED; {len(self.requests)} edit requests accepted"
            if self.superseded:
                listed = ", ".join(f"{f.case_id!r} of batch {f.batch_id!r}" for f in self.superseded)
                text += f", superseding {len(self.superseded)} earlier facts ({listed})"
            return text + "."
        by_rule = self.problems_by_rule()
        rules = ", ".join(f"{rule} x{n}" for rule, n in by_rule.items())
        bad_records = len(self.failed_positions)
        text = (
            f"{head} FAILED and is rejected whole; {sum(by_rule.values())} problems in {bad_records}"
            f"{'+' if self.omitted else ''} of {self.n_records} records ({rules})."
        )
        failed = [e.name for e in self.expectations if not e.success]
        if self.expectations:
            text += f" GX suite {SUITE_NAME!r}: {len(failed)} of {len(self.expectations)} expectations failed"
            text += f" ({', '.join(failed)})." if failed else "."
        examples = "; ".join(f"{_where(p)}: [{p.rule}] {p.message}" for p in self.problems[:max_examples])
        more = len(self.problems) - max_examples
        text += f" First problems: {examples}" + (f"; and {more} more." if more > 0 else ".")
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able account of the validation (the content of ``validation.json``)."""
        return {
            "batch_id": self.batch_id,
            "path": str(self.path),
            "sha256": self.sha256,
            "n_records": self.n_records,
            "passed": self.passed,
            "verdict": "passed" if self.passed else "failed",
            "summary": self.summary(),
            "n_problems": sum(self.problems_by_rule().values()),
            "problems_by_rule": self.problems_by_rule(),
            "problems": [_problem_dict(p) for p in self.problems],
            "n_warnings": sum(self.warnings_by_rule().values()),
            "warnings_by_rule": self.warnings_by_rule(),
            "warnings": [_problem_dict(p) for p in self.warnings],
            "omitted_by_rule": dict(self.omitted),
            "symlink_target": self.link_target,
            "accepted_case_ids": [r.case_id for r in self.requests],
            "superseded": [asdict(f) for f in self.superseded],
            "suite": SUITE_NAME,
            "expectations": [asdict(e) for e in self.expectations],
            "settings": asdict(self.settings),
        }


__all__ = [
    "BATCH_ID_PATTERN",
    "BatchNameError",
    "BatchValidation",
    "batch_id_for",
    "fallback_batch_id",
]


def problems_line(problems: dict[str, int] | None) -> str:
    """``12 problems: 8 gx:prompt_length, 2 ...`` from a rule -> count mapping ("" for none)."""
    if not problems:
        return ""
    total = sum(problems.values())
    return f"{total} problem{'s' if total != 1 else ''}: " + ", ".join(f"{n} {rule}" for rule, n in problems.items())
