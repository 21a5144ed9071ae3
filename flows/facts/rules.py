"""The night's problem vocabulary beyond the parser's: rule names, severities, batch-level positions.

The parser (:mod:`nas_core.formats`) names the record-schema rules; these are the rules a night
adds (decoding, batch name and size, tokenizer, ledger). ``gx:`` rules are the expectations of
:mod:`flows.facts.gx_suite`. One table decides every rule's severity, so the reports, the
quarantine decision and ``docs/FACT_SCHEMA.md`` agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from nas_core.formats import RULE_SEVERITY

#: ``RecordProblem.position`` of a problem that concerns the whole batch (row count, file
#: size, file name) rather than one record.
BATCH_POSITION = -1

#: Rules the night adds to :data:`nas_core.formats.RULES` (``gx:`` rules are in
#: :data:`flows.facts.gx_suite.EXPECTATIONS`).
RULES: Mapping[str, str] = MappingProxyType(
    {
        "not_utf8": "a line of the file is not valid UTF-8 (the message gives the byte offset)",
        "file_too_large": "the file is larger than ValidationSettings.max_file_bytes; it was not parsed",
        "invalid_batch_name": "the file name is not a valid batch id (see BATCH_ID_PATTERN)",
        "unencodable_text": "a text holds a lone surrogate (a JSON escape such as \\ud800) that no tokenizer accepts",
        "target_no_tokens": "target_new or target_true tokenises, with its leading space, to no real token",
        "target_too_many_tokens": "a target tokenises to more than ValidationSettings.max_target_tokens tokens",
        "subject_not_located": "the subject's last token cannot be located in the tokenised filled prompt",
        "ledger_conflict": "an earlier batch wrote the same fact with another answer (policy 'reject')",
        "already_applied": "an earlier batch wrote the same fact with the same answer",
        "duplicate_fact": "an earlier record of the same batch is about the same fact (flows.ledger.identity)",
        "relation_id_missing": "the record has no relation_id: its fact is recognised by subject and template only",
    }
)

#: Severities of :data:`RULES` (``gx:`` rules: ``gx:row_count`` is ``batch``, the others ``record``).
FLOW_RULE_SEVERITY: Mapping[str, str] = MappingProxyType(
    {
        rule: "batch" if rule in {"file_too_large", "invalid_batch_name"} else
        "warn" if rule == "relation_id_missing" else "record"
        for rule in RULES
    }
)


def severity_of(rule: str) -> str:
    """The severity of any rule the night reports (unknown rules refuse: fail closed)."""
    if rule.startswith("gx:"):
        return "batch" if rule == "gx:row_count" else "record"
    return FLOW_RULE_SEVERITY.get(rule) or RULE_SEVERITY.get(rule, "record")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: how problem messages quote user values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["BATCH_POSITION", "FLOW_RULE_SEVERITY", "RULES", "severity_of", "short"]
