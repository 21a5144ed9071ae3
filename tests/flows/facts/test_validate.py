"""Fact-batch validation: decoding, parser rules, the GX suite, tokenizer and ledger checks,
reports and quarantine.

Great Expectations takes a few hundred milliseconds per validation, so the batches are
validated once per module (``bad`` holds one minimal bad record per rule) and the tests
assert on the shared results.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from nights import record
from tokenizers import Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast

from flows.config.validation import ValidationSettings
from flows.facts.batch import BatchNameError, BatchValidation, batch_id_for
from flows.facts.gx_suite import EXPECTATIONS, SUITE_NAME, ExpectationOutcome, FactBatchSuite
from flows.facts.quarantine import quarantine
from flows.facts.report import write_report
from flows.facts.rules import BATCH_POSITION
from flows.facts.validate import validate_batch
from flows.ledger.facts import LedgerFact
from nas_core.formats import RULES as SCHEMA_RULES
from nas_core.formats import RecordProblem, parse_fact_jsonl
from nas_core.prompts import target_ids

REPO = Path(__file__).resolve().parents[3]
SCRIPT = "<script>alert(1)</script>"


def jsonl(*lines: dict | str) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


GOOD = (
    record("good-0", "Eiffel Tower"),
    record("good-1", "Mount Fuji", prompt="{} is located in the country of", target_new="Chile", target_true="Japan"),
    record("good-2", "Germany", prompt="The capital city of {} is", relation_id=None),
)

# Line index -> the record; each bad line breaks one rule, reported once (each rule is
# checked in one place: the parser, the GX suite or the night's own checks).
BAD_LINES: tuple[dict | str, ...] = (
    record("good-0", "Eiffel Tower"),  # 0: valid, but the batch fails as a whole
    '{"case_id": "broken", "prompt": ',  # 1: malformed_json
    record("wrong-type", "Place 2", target_new=5),  # 2: wrong_type
    record("no-subject", "x", subject=None),  # 3: missing_field
    record("empty-subject", "   "),  # 4: empty_field
    record("two-slots", "Place 5", prompt="{} and {} are in"),  # 5: template_placeholder_count
    record("same-answer", "Place 6", target_new="Paris", target_true="paris"),  # 6: target_equals_true
    record("dup", "Place 7"),  # 7: first use of "dup": kept, the later use is reported
    record("dup", "Place 8"),  # 8: duplicate_case_id
    record("tab", "Place 9", prompt="The {} is\tlocated in"),  # 9: control_character
    record("too-long", "Place 10", target_true="x" * 1001),  # 10: text_too_long (not also gx:target_true_length)
    record("long-prompt", "Place 11", prompt="The {} is located in" + " the city" * 32),  # 11: gx:prompt_length
    record("bad id!", "Place 12"),  # 12: invalid_case_id
    record("special-target", "Place 13", target_new="<eos>"),  # 13: target_no_tokens
    record("long-target", "Place 14", target_new=" ".join(["Rome"] * 8)),  # 14: target_too_many_tokens
    record("special-subject", "<pad>"),  # 15: subject_not_located (a special token)
    record("surrogate", "Bad\ud800"),  # 16: unencodable_text (json.dumps writes the \\ud800 escape)
    record("script-1", SCRIPT, relation_id="P999"),  # 17: valid
    record("script-2", SCRIPT, relation_id="P999", target_new="Milan"),  # 18: duplicate_fact of 17
    record("conflict", "Colosseum", target_new="Athens", target_true="Rome"),  # 19: ledger_conflict
    record("again", "Mount Fuji", relation_id="P17", target_new="Chile", target_true="Japan"),  # 20: already_applied
    "   ",  # 21: blank, skipped (positions stay line indices)
    "[1, 2]",  # 22: wrong_type (not an object)
)

LEDGER = (
    LedgerFact("Colosseum", "P131", "Milan", "old-7", "2025-01-01"),
    LedgerFact("mount fuji ", "P17", "chile", "old-9", "2025-01-02"),
)

# rule -> the positions where it must fire, and nowhere else.
EXPECTED = {
    "malformed_json": {1},
    "wrong_type": {2, 22},
    "missing_field": {3},
    "empty_field": {4},
    "template_placeholder_count": {5},
    "target_equals_true": {6},
    "duplicate_case_id": {8},
    "control_character": {9},
    "text_too_long": {10},
    "invalid_case_id": {12},
    "target_no_tokens": {13},
    "target_too_many_tokens": {14},
    "subject_not_located": {15},
    "unencodable_text": {16},
    "duplicate_fact": {18},
    "ledger_conflict": {19},
    "already_applied": {20},
    "gx:prompt_length": {11},
}


def case_at(position: int) -> str | None:
    line = BAD_LINES[position]
    return line.get("case_id") if isinstance(line, dict) else None


def positions(validation: BatchValidation, rule: str) -> set[int]:
    return {p.position for p in validation.problems if p.rule == rule}


def outcome(validation: BatchValidation, name: str) -> ExpectationOutcome:
    (found,) = [e for e in validation.expectations if e.name == name]
    return found


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="module")
def good_run(workdir, tok) -> tuple[BatchValidation, list]:
    """The good batch, validated by a fresh GX context in an empty working directory with the
    network refused; returns the validation and every connection or DNS lookup attempted."""
    folder = workdir / "good"
    folder.mkdir()
    path = folder / "2025-02-01.jsonl"
    path.write_bytes(jsonl(*GOOD))
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused by test_validate")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.chdir(folder)  # GX must leave no files behind, neither here nor in the repo
        # A new suite builds its GX context on first use: inside the guard.
        return validate_batch(path, tok, LEDGER[:1], suite=FactBatchSuite()), attempts


@pytest.fixture(scope="module")
def good(good_run) -> BatchValidation:
    return good_run[0]


@pytest.fixture(scope="module")
def bad(workdir, tok) -> BatchValidation:
    path = workdir / "bad-batch.jsonl"
    path.write_bytes(jsonl(*BAD_LINES))
    return validate_batch(path, tok, LEDGER)


@pytest.fixture(scope="module")
def superseding(workdir, tok) -> BatchValidation:
    """Line 19 of the bad batch alone, under "supersede", against a ledger that changed the fact twice."""
    path = workdir / "supersede.jsonl"
    path.write_bytes(jsonl(BAD_LINES[19]))
    ledger = (
        LedgerFact("Colosseum", "P131", "Athens", "old-1", "2025-01-01"),
        LedgerFact("Colosseum", "P131", "Milan", "old-2", "2025-01-05"),
    )
    return validate_batch(path, tok, ledger, ValidationSettings(conflict_policy="supersede"))


@pytest.fixture(scope="module")
def not_utf8(workdir, tok) -> tuple[BatchValidation, int]:
    """Line 1 holds a Latin-1 byte; returns the validation and that byte's offset in the file."""
    head = jsonl(GOOD[0])
    middle = jsonl(record("cafe", "Caf\u00e9")).replace(b"Caf\\u00e9", b"Caf\xe9")
    path = workdir / "latin1.jsonl"
    path.write_bytes(head + middle + jsonl(GOOD[2]))
    return validate_batch(path, tok, ()), len(head) + middle.index(b"\xe9")


# ----------------------------------------------------------------------------- good batches


def test_good_batch_passes_with_requests_in_file_order(good):
    expected = parse_fact_jsonl(jsonl(*GOOD).decode()).requests
    assert good.passed and good.problems == ()
    assert good.requests == expected and [r.case_id for r in good.requests] == ["good-0", "good-1", "good-2"]
    assert good.batch_id == "2025-02-01" and good.n_records == 3 and good.superseded == ()
    assert good.sha256 == hashlib.sha256(good.path.read_bytes()).hexdigest()
    assert "PASSED" in good.summary() and "3 edit requests" in good.summary()
    json.dumps(good.to_dict())  # JSON-able


def test_gx_suite_runs_every_expectation(good):
    assert [e.name for e in good.expectations] == list(EXPECTATIONS)
    assert list(EXPECTATIONS) == ["row_count", "prompt_length", "subject_length", "target_new_length",
                                  "target_true_length"]
    assert all(e.success for e in good.expectations)
    assert outcome(good, "row_count").observed == "3"
    assert outcome(good, "row_count").expectation_type == "expect_table_row_count_to_be_between"
    assert outcome(good, "prompt_length").expectation_type == "expect_column_value_lengths_to_be_between"
    assert good.to_dict()["suite"] == SUITE_NAME == "fact_batch"


def test_gx_leaves_no_files_and_makes_no_connection(good_run):
    good, attempts = good_run
    assert sorted(p.name for p in good.path.parent.iterdir()) == [good.path.name]
    assert not (REPO / "gx").exists() and not (REPO / "great_expectations").exists()
    assert attempts == []


def test_bom_is_accepted_and_gx_prints_nothing(tmp_path, tok, capfd):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(*GOOD[:2]))
    validation = validate_batch(path, tok, ())
    assert validation.passed, validation.summary()
    assert [r.case_id for r in validation.requests] == ["good-0", "good-1"]
    out, err = capfd.readouterr()
    assert out == "" and "Calculating Metrics" not in err  # GX progress bars are off


def test_ledger_supersede_accepts_and_lists_the_current_ledger_fact(superseding):
    assert superseding.passed, superseding.summary()
    assert [r.case_id for r in superseding.requests] == ["conflict"]
    # The ledger's last entry for the fact is what the model holds now.
    assert superseding.superseded == (LedgerFact("Colosseum", "P131", "Milan", "old-2", "2025-01-05"),)
    assert "superseding 1" in superseding.summary()


# ----------------------------------------------------------------------------- bad batches


def test_one_bad_record_fails_the_whole_batch(bad):
    assert not bad.passed and bad.requests == () and bad.superseded == ()
    assert positions(bad, "malformed_json") and 0 not in {p.position for p in bad.problems}  # line 0 is fine
    assert bad.n_records == len(BAD_LINES) - 1  # the blank line is not a record
    assert "FAILED" in bad.summary() and "\n" not in bad.summary()


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_each_rule_fires_on_its_record_only(bad, rule):
    assert positions(bad, rule) == EXPECTED[rule]
    for problem in bad.problems:
        if problem.rule == rule:
            assert problem.case_id == case_at(problem.position), problem
            assert problem.message


def test_no_unexpected_rules(bad):
    assert {p.rule for p in bad.problems} == set(EXPECTED)


def test_gx_outcomes_report_the_failing_rows(bad):
    long_prompt = outcome(bad, "prompt_length")
    assert not long_prompt.success and long_prompt.unexpected_count == 1
    assert long_prompt.unexpected_examples == (repr(BAD_LINES[11]["prompt"])[:59] + "…",)
    # Line 10's target_true has 1001 characters: the parser's text_too_long, not GX's too.
    assert outcome(bad, "target_true_length").success
    # 23 lines, one blank: 22 records, readable or not
    assert outcome(bad, "row_count").success and outcome(bad, "row_count").observed == "22"
    failed = {e.name for e in bad.expectations if not e.success}
    assert failed == {rule.removeprefix("gx:") for rule in EXPECTED if rule.startswith("gx:")}


def test_each_fault_is_reported_once(bad):
    # The parser owns the record schema; GX checks only the records the parser accepted, so no
    # line carries both a parser problem and a gx: problem.
    parser = {p.position for p in bad.problems if p.rule in SCHEMA_RULES}
    assert parser and parser.isdisjoint(p.position for p in bad.problems if p.rule.startswith("gx:"))


def test_a_record_the_parser_refuses_is_not_checked_again_by_gx(tmp_path, tok):
    path = tmp_path / "refused.jsonl"
    long_prompt = "The {} is located in" + " the city" * 32  # over max_prompt_chars, as on line 11
    path.write_bytes(jsonl(GOOD[0], record("refused", "Place 1", prompt=long_prompt, colour="red")))
    validation = validate_batch(path, tok, ())
    assert [(p.position, p.rule) for p in validation.problems] == [(1, "unknown_field")]
    assert outcome(validation, "prompt_length").success and outcome(validation, "row_count").observed == "2"


def test_problem_messages_name_the_evidence(bad):
    by_rule = {p.rule: p for p in bad.problems}
    assert "'old-7' of batch '2025-01-01'" in by_rule["ledger_conflict"].message
    assert "'old-9'" in by_rule["already_applied"].message
    assert "line 18 (case 'script-1')" in by_rule["duplicate_fact"].message
    assert "already used by record #7" in by_rule["duplicate_case_id"].message
    assert "at most 16" in by_rule["target_too_many_tokens"].message
    assert by_rule["target_no_tokens"].field == "target_new"


def test_target_check_uses_the_editors_token_ids(tok):
    # _target_problems batches the tokenizer calls; the ids must be target_ids' ids.
    many = " ".join(["Rome"] * 8)
    assert len(target_ids(tok, many)) > ValidationSettings().max_target_tokens
    assert len(target_ids(tok, "Rome")) <= ValidationSettings().max_target_tokens


def test_not_utf8_reports_the_byte_offset_and_checks_the_rest(not_utf8):
    validation, offset = not_utf8
    (problem,) = validation.problems
    assert problem.rule == "not_utf8" and problem.position == 1
    assert f"byte offset {offset}" in problem.message
    assert not validation.passed and validation.n_records == 3
    assert outcome(validation, "row_count").observed == "3"  # the undecodable line is a record too


def test_empty_batch_fails_the_row_count(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    validation = validate_batch(path, tok, ())
    assert not validation.passed
    (problem,) = validation.problems
    assert (problem.position, problem.rule) == (BATCH_POSITION, "gx:row_count")
    assert outcome(validation, "row_count").observed == "0"


def test_subject_that_encodes_to_nothing_is_not_located(tmp_path, tok):
    # A normaliser that drops "~" and no BOS: subject_last_token raises SubjectNotFoundError.
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Replace("~", "")
    backend.post_processor = None
    dropping = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    path = tmp_path / "tilde.jsonl"
    path.write_bytes(jsonl(record("tilde", "~~", prompt="{} is located in"), GOOD[0]))
    validation = validate_batch(path, dropping, ())
    (problem,) = validation.problems
    assert (problem.position, problem.case_id, problem.rule) == (0, "tilde", "subject_not_located")
    assert "empty subject span" in problem.message


def test_invalid_batch_name_is_a_problem_with_a_safe_id(tmp_path, tok):
    path = tmp_path / "bad name.jsonl"
    path.write_bytes(jsonl(GOOD[0]))
    validation = validate_batch(path, tok, ())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert validation.batch_id == f"invalid-name-{sha[:8]}" and not validation.passed
    assert [(p.position, p.rule) for p in validation.problems] == [(BATCH_POSITION, "invalid_batch_name")]


# ----------------------------------------------------------------------------- names, keys, settings


def test_batch_id_is_the_stem():
    assert batch_id_for(Path("data/inbox/2025-01-31.jsonl")) == "2025-01-31"
    assert batch_id_for("night_7.v2.jsonl") == "night_7.v2"
    assert batch_id_for(Path("../../etc.jsonl")) == "etc"  # only the name counts, never the folders


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "..jsonl",
        ".hidden.jsonl",
        "..\\..\\etc.jsonl",
        "a b.jsonl",
        "a.b c",
        "tab\there.jsonl",
        "nul\x00.jsonl",
        "new\nline.jsonl",
        "x" * 65 + ".jsonl",
        "caf\u00e9.jsonl",
        "-dash.jsonl",
    ],
)
def test_bad_batch_names_are_rejected(name):
    with pytest.raises(BatchNameError, match="must match") as info:
        batch_id_for(Path("inbox") / name)
    assert repr(Path(name).name) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"conflict_policy": "merge"},
        {"min_records": -1},
        {"max_records": 0},
        {"min_records": 5, "max_records": 4},
        {"max_prompt_chars": 1001},
        {"max_target_tokens": 0},
        {"max_subject_chars": True},
        {"max_file_bytes": 0},
    ],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError, match="validation\\."):
        ValidationSettings(**kwargs)


def test_ledger_fact_needs_every_field():
    with pytest.raises(ValueError, match="relation"):
        LedgerFact("Colosseum", " ", "Rome", "c", "b")


def test_oversized_file_is_not_read(tmp_path, tok):
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(*GOOD))
    validation = validate_batch(path, tok, (), ValidationSettings(max_file_bytes=10))
    assert [p.rule for p in validation.problems] == ["file_too_large"]
    assert validation.expectations == () and not validation.passed


# ----------------------------------------------------------------------------- reports


def test_report_escapes_user_text(bad, tmp_path):
    paths = write_report(bad, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["validation.html", "validation.json"]
    page = paths["html"].read_text(encoding="utf-8")
    assert "<script" not in page  # the page has no script at all: the subject's tag is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad id!" in page and "duplicate_case_id" in page and "gx:prompt_length" in page and bad.sha256 in page
    assert "<td>20</td><td>conflict</td><td>ledger_conflict</td>" in page  # line = position 19 + 1
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(bad.to_dict())) and data["passed"] is False
    assert {e["name"] for e in data["expectations"]} == set(EXPECTATIONS)


def test_report_overwrites_atomically(good, tmp_path):
    write_report(good, tmp_path)
    first = (tmp_path / "validation.json").read_text()
    write_report(good, tmp_path)
    assert (tmp_path / "validation.json").read_text() == first
    assert sorted(os.listdir(tmp_path)) == ["validation.html", "validation.json"]  # no temp files left


# ----------------------------------------------------------------------------- quarantine


def hand_made(path: Path, passed: bool = False) -> BatchValidation:
    """A BatchValidation without GX (quarantine only reads its fields)."""
    problem = RecordProblem(0, "x", "malformed_json", "line 1: Expecting value (column 1)")
    return BatchValidation(
        batch_id=batch_id_for(path),
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        n_records=1,
        passed=passed,
        problems=() if passed else (problem,),
        requests=(),
        superseded=(),
        expectations=(ExpectationOutcome("row_count", True, 0, (), "", "", "1"),),
    )


def test_quarantine_moves_the_file_byte_identically(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "2025-03-01.jsonl"
    content = b"\xef\xbb\xbf{not json\r\n\xff\xfe raw bytes\n"
    path.write_bytes(content)
    validation = hand_made(path)
    folder = quarantine(path, validation, tmp_path / "quarantine", {"stage": "validate", "at": tmp_path})
    assert folder == tmp_path / "quarantine" / "2025-03-01"
    assert not path.exists() and (folder / "2025-03-01.jsonl").read_bytes() == content
    assert sorted(p.name for p in folder.iterdir()) == [
        "2025-03-01.jsonl",
        "reason.json",
        "validation.html",
        "validation.json",
    ]
    reason = json.loads((folder / "reason.json").read_text())
    assert reason["reason"] == {"stage": "validate", "at": str(tmp_path)}
    assert reason["sha256"] == hashlib.sha256(content).hexdigest() == reason["validated_sha256"]
    assert reason["original_name"] == "2025-03-01.jsonl" and reason["quarantined_at"]


def test_second_quarantine_of_a_name_gets_a_new_folder(tmp_path):
    root = tmp_path / "quarantine"
    folders = []
    for n in range(3):
        path = tmp_path / "same.jsonl"
        path.write_bytes(f"batch {n}\n".encode())
        folders.append(quarantine(path, None, root, {"n": n}))
    assert [f.name for f in folders] == ["same", "same-2", "same-3"]
    for n, folder in enumerate(folders):  # nothing was overwritten
        assert (folder / "same.jsonl").read_bytes() == f"batch {n}\n".encode()
        assert json.loads((folder / "reason.json").read_text())["reason"] == {"n": n}


def test_quarantine_of_an_invalid_name_uses_a_safe_id(tmp_path):
    path = tmp_path / "..\\evil name.jsonl"
    path.write_bytes(b"payload\n")
    folder = quarantine(path, None, tmp_path / "q", {"why": "bad name"})
    sha = hashlib.sha256(b"payload\n").hexdigest()
    assert folder == tmp_path / "q" / f"invalid-name-{sha[:8]}"
    assert (folder / f"invalid-name-{sha[:8]}.jsonl").read_bytes() == b"payload\n" and not path.exists()
    assert json.loads((folder / "reason.json").read_text())["original_name"] == "..\\evil name.jsonl"


def test_quarantine_refuses_a_validation_of_another_file(tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_bytes(b"1\n")
    two.write_bytes(b"2\n")
    with pytest.raises(ValueError, match="not"):
        quarantine(two, hand_made(one), tmp_path / "q", {})
    assert two.exists() and not (tmp_path / "q").exists()
