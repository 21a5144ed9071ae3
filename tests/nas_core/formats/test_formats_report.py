"""The conversion report, the rules and their severities, and what every converter shares."""

from __future__ import annotations

from pathlib import Path

import pytest
from format_records import (
    fact_record,
)

from nas_core.formats.counterfact import from_counterfact_easyedit, from_counterfact_rome
from nas_core.formats.facts import from_fact_records
from nas_core.formats.report import (
    MAX_TEXT_CHARS,
    RULE_SEVERITY,
    RULES,
    SEVERITIES,
    RequestError,
)
from nas_core.formats.zsre import from_zsre_mend

DOCS = Path(__file__).resolve().parents[3] / "docs" / "FACT_SCHEMA.md"


# ---------------------------------------------------------------------- report


def test_summary_and_raise() -> None:
    report = from_fact_records([fact_record("a"), fact_record("a"), fact_record("a")])
    text = report.summary(max_examples=1)
    assert text.startswith("1 of 3 records converted, 2 failed")
    assert "duplicate_case_id: 2 problems in 2 records" in text
    assert "... and 1 more" in text
    with pytest.raises(RequestError) as caught:
        report.raise_for_problems()
    assert len(caught.value.problems) == 2 and isinstance(caught.value, ValueError)
    good = from_fact_records([fact_record()])
    good.raise_for_problems()
    assert good.summary() == "1 of 1 records converted, 0 failed"
    assert list(report.problems_by_rule()) == ["duplicate_case_id"]


def test_converters_reject_a_non_list() -> None:
    for convert in (from_counterfact_rome, from_counterfact_easyedit, from_zsre_mend):
        with pytest.raises(RequestError):
            convert({"case_id": 1})
    with pytest.raises(RequestError):
        from_fact_records("not records")


# ----------------------------------------------------------------------- rules


def test_every_rule_has_a_severity() -> None:
    assert set(RULE_SEVERITY) == set(RULES) and set(RULE_SEVERITY.values()) <= set(SEVERITIES)


def test_every_rule_is_documented() -> None:
    if not DOCS.exists():
        pytest.skip(f"{DOCS} not written yet")
    text = DOCS.read_text(encoding="utf-8")
    missing = [rule for rule in RULES if f"`{rule}`" not in text]
    assert not missing, f"rules missing from {DOCS.name}: {missing}"
    assert str(MAX_TEXT_CHARS) in text
