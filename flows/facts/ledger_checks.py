"""Checks of a batch's facts against the ledger's facts and against each other.

A record about a fact an earlier batch wrote is ``already_applied`` (same answer), a
``ledger_conflict`` (another answer, policy ``"reject"``) or supersedes the ledger fact
(policy ``"supersede"``); two records of one batch about the same fact are
``duplicate_fact``; a record without a relation id is warned about (``relation_id_missing``),
since a rephrased template of its fact would not be recognised. Identity is
:mod:`flows.ledger.identity`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.config.validation import ValidationSettings
from flows.ledger.facts import LedgerFact
from flows.ledger.identity import FactIdentity, identity_of, last_match
from nas_core.formats import RecordProblem
from nas_core.requests import EditRequest
from nas_core.text import fold


def _against_ledger(
    position: int, request: EditRequest, earlier: LedgerFact, s: ValidationSettings
) -> RecordProblem | None:
    """The problem of ``request`` about the fact ``earlier`` wrote; None when it supersedes it."""
    where = f"case {earlier.case_id!r} of batch {earlier.batch_id!r}"
    if fold(earlier.target_new, s.fold_confusables) == fold(request.target_new, s.fold_confusables):
        return RecordProblem(
            position, request.case_id, "already_applied",
            f"{where} already wrote {earlier.target_new!r} for this fact; applying it twice would edit the model "
            "again for nothing", "target_new")
    if s.conflict_policy == "reject":
        return RecordProblem(
            position, request.case_id, "ledger_conflict",
            f"{where} wrote {earlier.target_new!r} for this fact; this record says {request.target_new!r} "
            "(conflict_policy 'reject')", "target_new")
    return None


def ledger_problems(
    requests: Sequence[tuple[int, EditRequest]], ledger: Sequence[LedgerFact], s: ValidationSettings
) -> tuple[list[RecordProblem], list[LedgerFact]]:
    """``duplicate_fact``, ``already_applied``, ``ledger_conflict`` and ``relation_id_missing``
    problems of the ``(position, request)`` pairs, and the ledger facts they supersede."""
    conf = s.fold_confusables
    # Ledger order is application order: the last matching entry is what the model holds.
    known = [(fact.identity(conf), fact) for fact in ledger]
    problems: list[RecordProblem] = []
    superseded: list[LedgerFact] = []
    seen: list[tuple[FactIdentity, tuple[int, str]]] = []
    for position, request in requests:
        key = identity_of(request.subject, request.relation_id, request.prompt, conf)
        if not request.relation_id:
            problems.append(RecordProblem(position, request.case_id, "relation_id_missing",
                                          "no relation_id: this fact is recognised by its subject and prompt template "
                                          "only, so a rephrased template of it would not be", "relation_id", "warn"))
        first = last_match(key, seen)
        if first is not None:
            problems.append(RecordProblem(
                position, request.case_id, "duplicate_fact",
                f"record on line {first[0] + 1} (case {first[1]!r}) is already about this fact ({key.describe()})",
                "subject"))
        seen.append((key, (position, request.case_id)))
        earlier = last_match(key, known)
        if earlier is None:
            continue
        problem = _against_ledger(position, request, earlier, s)
        if problem is not None:
            problems.append(problem)
        elif earlier not in superseded:
            superseded.append(earlier)
    return problems, superseded


__all__ = ["ledger_problems"]
