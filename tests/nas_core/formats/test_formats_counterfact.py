"""CounterFact converters: the ROME layout and the EasyEdit layout."""

from __future__ import annotations

import copy

import pytest
from format_records import (
    assert_mostly_converts,
    easyedit_record,
    load_shared,
    rome_record,
    rules,
)

from nas_core.formats.counterfact import from_counterfact_easyedit, from_counterfact_rome
from nas_core.requests import EditRequest, NeighbourhoodPrompt

# ----------------------------------------------------------------- ROME layout


def test_rome_converts_all_fields() -> None:
    report = from_counterfact_rome([rome_record()])
    assert report.ok and report.n_total == 1 and report.n_failed == 0
    (req,) = report.requests
    assert req == EditRequest(
        case_id="7",
        prompt="{} is located in",
        subject="Angola",
        target_new="Antarctica",  # leading space stripped
        target_true="Africa",
        relation_id="P30",
        paraphrase_prompts=("Angola belongs to the continent of",),
        neighbourhood_prompts=(
            NeighbourhoodPrompt("Ghana is in", "Africa"),
            NeighbourhoodPrompt("Ethiopia is in", "Africa"),
        ),
        generation_prompts=("People around Angola speak",),
    )
    assert req.filled_prompt == "Angola is located in"


def test_rome_reports_every_bad_record() -> None:
    no_brace = rome_record(1)
    no_brace["requested_rewrite"]["prompt"] = "Angola is located in"
    same = rome_record(2)
    same["requested_rewrite"]["target_new"]["str"] = " africa"
    missing = rome_record(3)
    del missing["requested_rewrite"]["subject"]
    bad_para = rome_record(4)
    bad_para["paraphrase_prompts"] = ["Ghana is in"]
    records = [rome_record(0), no_brace, same, missing, bad_para, rome_record(0), "junk"]
    report = from_counterfact_rome(records)
    assert [r.case_id for r in report.requests] == ["0", "4"]
    assert [(p.position, p.rule) for p in report.problems] == [
        (1, "template_placeholder_count"),
        (2, "target_equals_true"),
        (3, "missing_field"),
        (5, "duplicate_case_id"),
        (6, "wrong_type"),
    ]
    assert [(w.position, w.rule) for w in report.warnings] == [(4, "subject_not_in_prompt")]
    assert report.n_failed == 5 and report.n_total == 7
    assert report.problems[2].field == "requested_rewrite.subject"
    assert report.problems[0].case_id == "1" and report.problems[-1].case_id is None


def test_rome_neighbourhood_objects_and_wrong_types() -> None:
    rec = rome_record()
    rec["neighborhood_prompts"] = [{"prompt": "Ghana is in", "target": "Africa"}, "Mali is in"]
    (req,) = from_counterfact_rome([rec]).requests
    assert [n.target for n in req.neighbourhood_prompts] == ["Africa", "Africa"]
    rec["paraphrase_prompts"] = "Angola is in"
    rec["case_id"] = 1.5
    report = from_counterfact_rome([rec])
    assert rules(report) == ["wrong_type", "wrong_type"]


def test_inputs_are_not_mutated() -> None:
    records = [rome_record(), rome_record()]
    before = copy.deepcopy(records)
    from_counterfact_rome(records)
    assert records == before


# ------------------------------------------------------------- EasyEdit layout


def test_easyedit_rebuilds_the_template() -> None:
    (req,) = from_counterfact_easyedit([easyedit_record()]).requests
    assert req.case_id == "0"
    assert req.prompt == "The mother tongue of {} is"
    assert req.subject == "Danielle Darrieux"
    assert (req.target_new, req.target_true) == ("English", "French")
    assert req.paraphrase_prompts == (
        "Where Danielle Darrieux is from, people speak the language of",
    )
    assert req.neighbourhood_prompts == (
        NeighbourhoodPrompt("Michel Rocard is a native speaker of", "French"),
    )
    assert req.filled_prompt == easyedit_record()["prompt"]


def test_easyedit_subject_not_found_is_reported_not_dropped() -> None:
    lost = easyedit_record(1)
    lost["subject"] = "Catherine Deneuve"
    lost["rephrase_prompt"] = "Catherine Deneuve speaks"
    report = from_counterfact_easyedit([easyedit_record(0), lost, easyedit_record(2)])
    assert [r.case_id for r in report.requests] == ["0", "2"]
    (problem,) = report.problems
    assert (problem.position, problem.case_id, problem.rule) == (1, "1", "subject_not_found")
    assert problem.field == "prompt"


def test_easyedit_case_insensitive_match_keeps_prompt_spelling() -> None:
    rec = easyedit_record()
    rec["subject"] = "danielle darrieux"
    (req,) = from_counterfact_easyedit([rec]).requests
    assert req.subject == "Danielle Darrieux"
    assert req.filled_prompt == rec["prompt"]


def test_easyedit_missing_locality_partner_and_all_problems() -> None:
    rec = easyedit_record()
    del rec["locality_ground_truth"]
    rec["ground_truth"] = "  "
    report = from_counterfact_easyedit([rec])
    assert sorted(rules(report)) == ["empty_field", "missing_field"]
    assert not report.requests


# ----------------------------------------------------------------- shared data


@pytest.mark.shared_data
def test_shared_counterfact_rome_500() -> None:
    report = from_counterfact_rome(load_shared("counterfact/counterfact_500.json"))
    assert_mostly_converts(report, 500, 0.01)
    assert all(len(r.neighbourhood_prompts) == 10 for r in report.requests)


@pytest.mark.shared_data
def test_shared_counterfact_easyedit_all_21919() -> None:
    reports = [
        from_counterfact_easyedit(load_shared(f"counterfact/counterfact-{split}.json"))
        for split in ("train", "edit", "val")
    ]
    assert [r.n_total for r in reports] == [10_000, 10_000, 1_919]
    total = sum(r.n_total for r in reports)
    converted = sum(len(r.requests) for r in reports)
    failed = sum(r.n_failed for r in reports)
    assert total == 21_919 and converted + failed == total
    assert failed < 0.01 * total, "\n".join(r.summary() for r in reports)
    ids = [r.case_id for rep in reports for r in rep.requests]
    assert len(set(ids)) == len(ids)  # the three files do not overlap
    for rep in reports:
        for req in rep.requests:
            assert req.prompt.count("{}") == 1


@pytest.mark.shared_data
def test_shared_rome_and_easyedit_agree() -> None:
    rome = {
        r.case_id: r
        for r in from_counterfact_rome(load_shared("counterfact/counterfact_500.json")).requests
    }
    easy = {}
    for split in ("train", "edit", "val"):
        for req in from_counterfact_easyedit(
            load_shared(f"counterfact/counterfact-{split}.json")
        ).requests:
            if req.case_id in rome:
                easy[req.case_id] = req
    assert set(easy) == set(rome)
    for case_id, req in rome.items():
        other = easy[case_id]
        assert (other.prompt, other.subject) == (req.prompt, req.subject)
        assert (other.target_new, other.target_true) == (req.target_new, req.target_true)
