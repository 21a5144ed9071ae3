"""Edit-request converters: CounterFact (ROME, EasyEdit), zsRE (MEND) and the fact schema."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest

from nas_core.formats import (
    MAX_TEXT_CHARS,
    RULE_SEVERITY,
    RULES,
    SEVERITIES,
    ConversionReport,
    RecordProblem,
    RequestError,
    SchemaPolicy,
    check_request,
    from_counterfact_easyedit,
    from_counterfact_rome,
    from_fact_records,
    from_zsre_mend,
    parse_fact_jsonl,
    template_from_filled,
    to_fact_record,
)
from nas_core.requests import EditRequest, NeighbourhoodPrompt

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "FACT_SCHEMA.md"


def rules(report: ConversionReport) -> list[str]:
    return [p.rule for p in report.problems]


# ----------------------------------------------------------------------------- fixtures


def rome_record(case_id: int = 7) -> dict:
    return {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "relation_id": "P30",
            "target_new": {"str": " Antarctica", "id": "Q51"},
            "target_true": {"str": "Africa", "id": "Q15"},
            "subject": "Angola",
        },
        "paraphrase_prompts": ["Angola belongs to the continent of"],
        "neighborhood_prompts": ["Ghana is in", "Ethiopia is in"],
        "attribute_prompts": ["Ross Island is located in"],
        "generation_prompts": ["People around Angola speak"],
    }


def easyedit_record(case_id: int = 0) -> dict:
    return {
        "case_id": case_id,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }


def zsre_record() -> dict:
    return {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": " unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    }


def fact_record(case_id: str = "eiffel-1") -> dict:
    return {
        "case_id": case_id,
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "relation_id": "P131",
        "paraphrase_prompts": ["Where is the Eiffel Tower? It is in the city of"],
        "neighbourhood_prompts": [
            {"prompt": "The Louvre is located in the city of", "target": "Paris"}
        ],
        "generation_prompts": ["The Eiffel Tower is"],
    }


# ----------------------------------------------------------------------------- ROME layout


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


def test_converters_reject_a_non_list() -> None:
    for convert in (from_counterfact_rome, from_counterfact_easyedit, from_zsre_mend):
        with pytest.raises(RequestError):
            convert({"case_id": 1})
    with pytest.raises(RequestError):
        from_fact_records("not records")


# ----------------------------------------------------------------------------- EasyEdit layout


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


@pytest.mark.parametrize(
    ("filled", "subject", "expected"),
    [
        ("Rome is the capital of Italy", "Rome", ("{} is the capital of Italy", "Rome")),
        # whole-word match preferred over an earlier match inside a longer word
        ("Romeo was born in Rome", "Rome", ("Romeo was born in {}", "Rome")),
        # otherwise the first occurrence
        ("Paris, Paris is", "Paris", ("{}, Paris is", "Paris")),
        ("Denmark-Norway and Norway", "Norway", ("Denmark-{} and Norway", "Norway")),
        ("the iPhone is made by", "IPHONE", ("the {} is made by", "iPhone")),
        ("Nothing here", "Rome", None),
        ("C++ was designed by", "C++", ("{} was designed by", "C++")),
    ],
)
def test_template_from_filled(filled: str, subject: str, expected: tuple | None) -> None:
    assert template_from_filled(filled, subject) == expected


# ----------------------------------------------------------------------------- zsRE


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


# ----------------------------------------------------------------------------- fact schema


def test_fact_record_converts_and_round_trips() -> None:
    report = from_fact_records([fact_record()])
    assert report.ok
    (req,) = report.requests
    assert req.neighbourhood_prompts == (
        NeighbourhoodPrompt("The Louvre is located in the city of", "Paris"),
    )
    assert to_fact_record(req) == fact_record()
    assert from_fact_records([to_fact_record(req)]).requests == (req,)
    assert check_request(req) == ()


def test_round_trip_of_benchmark_requests() -> None:
    reqs = (
        from_counterfact_rome([rome_record()]).requests
        + from_counterfact_easyedit([easyedit_record()]).requests
        + from_zsre_mend([zsre_record()]).requests
    )
    back = from_fact_records([to_fact_record(r) for r in reqs])
    assert back.ok and back.requests == reqs


def test_minimal_fact_record_and_defaults() -> None:
    rec = {k: fact_record()[k] for k in ("case_id", "prompt", "subject", "target_new")}
    rec["target_true"] = "Paris"
    (req,) = from_fact_records([rec]).requests
    assert req.relation_id == "" and req.paraphrase_prompts == () and req.generation_prompts == ()
    assert to_fact_record(req) == rec


def test_fact_texts_are_stripped() -> None:
    rec = fact_record()
    rec["target_new"] = " Rome "
    rec["prompt"] = "{} is located in the city of "
    (req,) = from_fact_records([rec]).requests
    assert req.target_new == "Rome" and req.prompt == "{} is located in the city of"


def _one_problem(**changes: object) -> RecordProblem:
    rec = fact_record()
    for key, value in changes.items():
        if value is KeyError:
            del rec[key]
        else:
            rec[key] = value
    report = from_fact_records([rec])
    assert not report.requests
    assert len(report.problems) == 1, report.summary()
    return report.problems[0]


@pytest.mark.parametrize(
    ("changes", "rule", "field"),
    [
        ({"target_true": KeyError}, "missing_field", "target_true"),
        ({"colour": "red"}, "unknown_field", "colour"),
        ({"subject": ""}, "empty_field", "subject"),
        ({"subject": "   "}, "empty_field", "subject"),
        ({"target_new": 5}, "wrong_type", "target_new"),
        ({"case_id": 12}, "wrong_type", "case_id"),
        ({"paraphrase_prompts": "The Eiffel Tower is in"}, "wrong_type", "paraphrase_prompts"),
        ({"paraphrase_prompts": [None]}, "wrong_type", "paraphrase_prompts[0]"),
        ({"relation_id": ["P131"]}, "wrong_type", "relation_id"),
        ({"case_id": "has space"}, "invalid_case_id", "case_id"),
        ({"case_id": "x" * 65}, "invalid_case_id", "case_id"),
        ({"prompt": "The Eiffel Tower is located in"}, "template_placeholder_count", "prompt"),
        ({"prompt": "{} and {} are in"}, "template_placeholder_count", "prompt"),
        ({"target_new": " paris "}, "target_equals_true", "target_new"),
        ({"prompt": "{{}} is in"}, "template_stray_brace", "prompt"),
        ({"prompt": "{} is {subject} in"}, "template_stray_brace", "prompt"),
        ({"prompt": "{} is in }"}, "template_stray_brace", "prompt"),
        ({"target_new": "Ｐａｒｉｓ"}, "target_equals_true", "target_new"),
        ({"target_new": "Pa‍ris"}, "target_equals_true", "target_new"),
        ({"target_new": "Pаris"}, "target_equals_true", "target_new"),  # Cyrillic a
        ({"target_new": "Pa\u0301ris", "target_true": "P\u00e1ris"},
         "target_equals_true", "target_new"),  # NFD vs NFC
        ({"subject": "ㅤ"}, "empty_field", "subject"),  # Hangul filler
        ({"subject": "⠀⠀"}, "empty_field", "subject"),  # braille blank
        ({"target_new": "́́"}, "empty_field", "target_new"),  # combining marks alone
        ({"target_new": "️"}, "empty_field", "target_new"),  # a variation selector
        ({"target_new": "x" * (MAX_TEXT_CHARS + 1)}, "text_too_long", "target_new"),
        ({"target_new": "Ro\nme"}, "control_character", "target_new"),
        ({"relation_id": "P\x00"}, "control_character", "relation_id"),
        ({"target_true": "Par\u2028is"}, "control_character", "target_true"),
        ({"neighbourhood_prompts": ["Paris"]}, "wrong_type", "neighbourhood_prompts[0]"),
        (
            {"neighbourhood_prompts": [{"prompt": "The Louvre is in"}]},
            "missing_field",
            "neighbourhood_prompts[0].target",
        ),
        (
            {"neighbourhood_prompts": [{"prompt": "The Louvre is in", "target": "X", "w": 1}]},
            "unknown_field",
            "neighbourhood_prompts[0].w",
        ),
    ],
)
def test_fact_rules(changes: dict, rule: str, field: str) -> None:
    problem = _one_problem(**changes)
    assert (problem.rule, problem.field) == (rule, field)
    assert problem.position == 0 and problem.message


def test_text_at_the_length_bound_is_accepted() -> None:
    rec = fact_record()
    rec["generation_prompts"] = ["y" * MAX_TEXT_CHARS]
    assert from_fact_records([rec]).ok


def test_fact_batch_reports_all_bad_records() -> None:
    bad_a = fact_record("a")
    bad_a["target_new"] = "Paris"
    bad_b = fact_record("b")
    bad_b.update(prompt="no placeholder", colour="red")
    del bad_b["subject"]
    records = [fact_record("ok-1"), bad_a, bad_b, fact_record("ok-1"), fact_record("ok-2"), 3]
    report = from_fact_records(records)
    assert [r.case_id for r in report.requests] == ["ok-1", "ok-2"]
    assert [(p.position, p.rule) for p in report.problems] == [
        (1, "target_equals_true"),
        (2, "unknown_field"),
        (2, "missing_field"),
        (2, "template_placeholder_count"),
        (3, "duplicate_case_id"),
        (5, "wrong_type"),
    ]
    assert report.failed_positions == (1, 2, 3, 5)
    assert report.n_failed == 4 and report.n_total == 6
    assert report.problems[0].case_id == "a"
    assert "#0" in report.problems[4].message  # points at the first use


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


def test_check_request_flags_benchmark_newlines() -> None:
    req = EditRequest(
        "c1", "{} is in", "Angola", "Asia", "Africa", paraphrase_prompts=("x\nAngola is in",)
    )
    assert not check_request(req)  # evaluation-only texts warn, never refuse
    report = from_fact_records([to_fact_record(req)])
    assert [(w.rule, w.severity) for w in report.warnings] == [("eval_text_control_character", "warn")]
    assert report.requests[0].paraphrase_prompts == ("x\nAngola is in",)


@pytest.mark.parametrize(
    ("changes", "rule", "field"),
    [
        ({"paraphrase_prompts": ["It is in"]}, "subject_not_in_prompt", "paraphrase_prompts[0]"),
        ({"paraphrase_prompts": ["The famous Eiffel-Tower stands in"]}, "subject_not_in_prompt",
         "paraphrase_prompts[0]"),
        ({"paraphrase_prompts": ["The Eiffel Tower\nis in"]}, "eval_text_control_character",
         "paraphrase_prompts[0]"),
        ({"generation_prompts": ["a\tb"]}, "eval_text_control_character", "generation_prompts[0]"),
        ({"generation_prompts": [""]}, "eval_text_dropped", "generation_prompts[0]"),
        ({"paraphrase_prompts": ["\u3164"]}, "eval_text_dropped", "paraphrase_prompts[0]"),
        ({"neighbourhood_prompts": [{"prompt": "The Louvre is in", "target": " "}]}, "eval_text_dropped",
         "neighbourhood_prompts[0].target"),
        ({"neighbourhood_prompts": [{"prompt": "The Louvre is in", "target": "Paris"}] * 25}, "list_too_long",
         "neighbourhood_prompts"),
        ({"paraphrase_prompts": ["The Eiffel Tower is in"] * 21}, "list_too_long", "paraphrase_prompts"),
    ],
)
def test_evaluation_only_problems_warn_and_keep_the_fact(changes: dict, rule: str, field: str) -> None:
    rec = fact_record()
    rec.update(changes)
    report = from_fact_records([rec])
    assert not report.problems and len(report.requests) == 1, report.summary()
    (warning,) = report.warnings
    assert (warning.rule, warning.field, warning.severity) == (rule, field, "warn")
    req = report.requests[0]
    assert len(req.paraphrase_prompts) <= 20 and len(req.neighbourhood_prompts) <= 20
    assert "" not in req.generation_prompts and "\u3164" not in req.paraphrase_prompts


def test_list_bounds_come_from_the_policy() -> None:
    rec = fact_record()
    rec["paraphrase_prompts"] = ["The Eiffel Tower is in"] * 3
    report = from_fact_records([rec], SchemaPolicy(max_paraphrases=2))
    assert len(report.requests[0].paraphrase_prompts) == 2 and report.warnings[0].rule == "list_too_long"
    with pytest.raises(ValueError, match="max_paraphrases"):
        SchemaPolicy(max_paraphrases=-1)


def test_confusables_fold_only_by_policy() -> None:
    rec = fact_record()
    rec["target_new"] = "P\u0430ris"  # Cyrillic a
    assert not from_fact_records([rec], SchemaPolicy(fold_confusables=True)).requests
    assert from_fact_records([rec], SchemaPolicy(fold_confusables=False)).requests


def test_every_rule_has_a_severity() -> None:
    assert set(RULE_SEVERITY) == set(RULES) and set(RULE_SEVERITY.values()) <= set(SEVERITIES)


# ----------------------------------------------------------------------------- JSONL


def test_parse_fact_jsonl() -> None:
    lines = [
        json.dumps(fact_record("a")),
        "",
        "{not json",
        "   ",
        "[1, 2]",
        json.dumps(fact_record("b")),
        '{"case_id": "c", "case_id": "d"}',
        json.dumps({**fact_record("e"), "target_new": "Paris"}),
    ]
    report = parse_fact_jsonl("\ufeff" + "\r\n".join(lines) + "\n")
    assert [r.case_id for r in report.requests] == ["a", "b"]
    assert [(p.position, p.rule) for p in report.problems] == [
        (2, "malformed_json"),
        (4, "wrong_type"),
        (6, "duplicate_field"),
        (7, "target_equals_true"),
    ]
    assert "line 3" in report.problems[0].message and "column" in report.problems[0].message
    assert report.n_total == 6 and report.n_failed == 4


def test_parse_fact_jsonl_empty_and_round_trip() -> None:
    empty = parse_fact_jsonl("\n\n")
    assert empty.ok and empty.requests == () and empty.n_total == 0
    reqs = from_fact_records([fact_record("a"), fact_record("b")]).requests
    text = "\n".join(json.dumps(to_fact_record(r)) for r in reqs)
    assert parse_fact_jsonl(text).requests == reqs
    with pytest.raises(RequestError):
        parse_fact_jsonl(b"{}")  # type: ignore[arg-type]


def test_inputs_are_not_mutated() -> None:
    records = [rome_record(), rome_record()]
    before = copy.deepcopy(records)
    from_counterfact_rome(records)
    assert records == before


def test_every_rule_is_documented() -> None:
    if not DOCS.exists():
        pytest.skip(f"{DOCS} not written yet")
    text = DOCS.read_text(encoding="utf-8")
    missing = [rule for rule in RULES if f"`{rule}`" not in text]
    assert not missing, f"rules missing from {DOCS.name}: {missing}"
    assert str(MAX_TEXT_CHARS) in text


# ----------------------------------------------------------------------------- shared data


def _load(relative: str) -> list:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (expected ../shared/data next to the repo)")
    return _read_json(path)


@functools.cache
def _read_json(path: Path) -> list:
    """Parsed once per session; the converters never mutate their input."""
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _assert_mostly_converts(report: ConversionReport, total: int, max_failed_share: float) -> None:
    assert report.n_total == total
    assert len(report.requests) + report.n_failed == total
    assert report.n_failed <= max_failed_share * total, report.summary()


@pytest.mark.shared_data
def test_shared_counterfact_rome_500() -> None:
    report = from_counterfact_rome(_load("counterfact/counterfact_500.json"))
    _assert_mostly_converts(report, 500, 0.01)
    assert all(len(r.neighbourhood_prompts) == 10 for r in report.requests)


@pytest.mark.shared_data
def test_shared_counterfact_easyedit_all_21919() -> None:
    reports = [
        from_counterfact_easyedit(_load(f"counterfact/counterfact-{split}.json"))
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
        for r in from_counterfact_rome(_load("counterfact/counterfact_500.json")).requests
    }
    easy = {}
    for split in ("train", "edit", "val"):
        for req in from_counterfact_easyedit(
            _load(f"counterfact/counterfact-{split}.json")
        ).requests:
            if req.case_id in rome:
                easy[req.case_id] = req
    assert set(easy) == set(rome)
    for case_id, req in rome.items():
        other = easy[case_id]
        assert (other.prompt, other.subject) == (req.prompt, req.subject)
        assert (other.target_new, other.target_true) == (req.target_new, req.target_true)


@pytest.mark.shared_data
def test_shared_zsre() -> None:
    report = from_zsre_mend(_load("zsre/zsre_mend_train-1k.json"))
    # The MEND file has 2 empty `alt` answers and 17 whose `alt` equals answers[0]: 1.9 %.
    _assert_mostly_converts(report, 1000, 0.025)
    assert {rule: len(p) for rule, p in report.problems_by_rule().items()} == {
        "target_equals_true": 17,
        "empty_field": 2,
    }
