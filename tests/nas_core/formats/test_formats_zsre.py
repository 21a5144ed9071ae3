"""The zsRE converter (MEND layout)."""

from __future__ import annotations

import pytest
from format_records import (
    assert_mostly_converts,
    load_shared,
    rules,
    zsre_record,
)

from nas_core.formats.zsre import from_zsre_mend
from nas_core.requests import NeighbourhoodPrompt

# ------------------------------------------------------------------------ zsRE


def test_zsre_converts() -> None:
    report = from_zsre_mend([zsre_record(), zsre_record()])
    assert rules(report) == []
    first, second = report.requests
    assert (first.case_id, second.case_id) == ("zsre-0", "zsre-1")
    assert first.prompt == "What is the product made by {}?"
    assert first.subject == "UniFirst"
    assert (first.target_new, first.target_true) == ("unmanned aircraft", "uniform")
    assert first.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert first.neighbourhood_prompts == (
        NeighbourhoodPrompt(
            "nq question: john goodman's character in the big lebowski", "Walter Sobchak"
        ),
    )


def test_zsre_problems() -> None:
    empty_alt = zsre_record()
    empty_alt["alt"] = ""
    same = zsre_record()
    same["alt"] = "Uniform"
    lost = zsre_record()
    lost["subject"] = "Acme"
    no_answers = zsre_record()
    del no_answers["answers"]
    no_truth = zsre_record()
    del no_truth["answers"], no_truth["pred"]
    report = from_zsre_mend([empty_alt, same, lost, no_answers, no_truth])
    assert [(p.position, p.rule) for p in report.problems] == [
        (0, "empty_field"),
        (1, "target_equals_true"),
        (2, "subject_not_found"),
        (4, "missing_field"),
    ]
    (req,) = report.requests
    assert req.case_id == "zsre-3" and req.target_true == "uniform"  # pred fallback


# ----------------------------------------------------------------- shared data


@pytest.mark.shared_data
def test_shared_zsre() -> None:
    report = from_zsre_mend(load_shared("zsre/zsre_mend_train-1k.json"))
    # The MEND file has 2 empty `alt` answers and 17 whose `alt` equals answers[0]: 1.9 %.
    assert_mostly_converts(report, 1000, 0.025)
    assert {rule: len(p) for rule, p in report.problems_by_rule().items()} == {
        "target_equals_true": 17,
        "empty_field": 2,
    }
