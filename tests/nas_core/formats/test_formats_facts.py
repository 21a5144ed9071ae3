"""The fact-batch schema: records, JSONL, the way back (to_fact_record) and check_request."""

from __future__ import annotations

import json

import pytest
from format_records import (
    easyedit_record,
    fact_record,
    rome_record,
    zsre_record,
)

from nas_core.formats.counterfact import from_counterfact_easyedit, from_counterfact_rome
from nas_core.formats.facts import check_request, from_fact_records, parse_fact_jsonl, to_fact_record
from nas_core.formats.report import (
    MAX_TEXT_CHARS,
    RecordProblem,
    RequestError,
    SchemaPolicy,
)
from nas_core.formats.zsre import from_zsre_mend
from nas_core.requests import EditRequest, NeighbourhoodPrompt

# ----------------------------------------------------------------- fact schema


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


# ----------------------------------------------------------------------- JSONL


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
