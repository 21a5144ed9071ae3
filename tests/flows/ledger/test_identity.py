"""Fact identity (flows.ledger.identity) and the text folding it rests on (nas_core.text): the same
fact cannot be re-edited to a contradictory target by changing case, whitespace, Unicode form
or the relation id's spelling, nor twice in one batch."""

from __future__ import annotations

import json

import pytest
from nights import record

from flows.config.validation import ValidationSettings
from flows.facts.validate import validate_batch
from flows.ledger.facts import LedgerFact
from flows.ledger.identity import identity_of, latest_facts
from nas_core.text import fold, has_visible

LEDGER = (LedgerFact("Colosseum", "P131", "Milan", "old-7", "2025-01-01", "The {} is located in the city of"),)


def rec(case_id: str, subject: str = "Colosseum", **fields) -> dict:
    return record(case_id, subject, **({"target_new": "Athens", "target_true": "Rome"} | fields))


def rules(tmp_path, tok, *records, ledger=LEDGER, **settings) -> list[tuple[int, str]]:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    v = validate_batch(path, tok, ledger, ValidationSettings(**settings))
    return [(p.position, p.rule) for p in v.problems]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("The Eiffel Tower", "  the  eiffel\u00a0TOWER "),  # case, doubled and non-breaking spaces
        ("Caf\u00e9", "Cafe\u0301"),  # NFC vs NFD
        ("Paris", "\uff30\uff41\uff52\uff49\uff53"),  # full-width letters
        ("Paris", "Pa\u200dris"),  # a zero-width joiner
        ("Paris", "P\u0430ris"),  # Cyrillic a (confusables folded)
        ("Paris", "Paris\ufe0f"),  # a variation selector
    ],
)
def test_fold_makes_equal_what_reads_equal(a, b):
    assert fold(a, confusables=True) == fold(b, confusables=True)


def test_fold_keeps_different_texts_different():
    assert fold("Paris") != fold("Parus") and fold("P\u0430ris") != fold("Paris")  # no confusables by default


@pytest.mark.parametrize("text", ["\u3164", "\u2800", "\u0301", "\ufe0f\u200b", " \u00a0", "\u115f\u1160"])
def test_invisible_texts_have_no_visible_character(text):
    assert not has_visible(text)


def test_identity_rule():
    base = identity_of("Colosseum", "P131", "The {} is located in the city of")
    assert base.same_fact(identity_of(" colosseum ", "p131", "{} stands in"))  # same relation, other template
    assert base.same_fact(identity_of("Colosseum", "", "The {}  is located in the city of"))  # no relation: template
    assert not base.same_fact(identity_of("Colosseum", "", "{} was built by"))
    assert not base.same_fact(identity_of("Colosseum", "P84", "{} was built by"))
    assert not base.same_fact(identity_of("Pantheon", "P131", "The {} is located in the city of"))


def test_latest_facts_keeps_the_last_record_of_each_fact():
    items = [("Colosseum", "P131", "{} is in", 1), ("Pantheon", "P131", "{} is in", 2),
             ("COLOSSEUM", "p131", "{} stands in", 3)]
    kept = latest_facts(items, lambda t: identity_of(t[0], t[1], t[2]))
    assert [t[3] for t in kept] == [2, 3]


@pytest.mark.parametrize(
    "changes",
    [
        {"relation_id": "p131"},  # relation id case
        {"relation_id": " P131 "},
        {"relation_id": None},  # relation omitted: the same template is the same fact
        {"subject": "colosseum"},
        {"subject": "Colos\u00adseum"},  # a soft hyphen (Cf)
        {"subject": "\uff23olosseum"},  # a full-width C
        {"subject": "Col\u043esseum"},  # a Cyrillic o
        {"subject": "Colosseum\u00a0"},
    ],
)
def test_a_ledger_fact_cannot_be_walked_around(tmp_path, tok, changes):
    found = rules(tmp_path, tok, rec("c1", **changes))
    assert (0, "ledger_conflict") in found


def test_the_same_fact_twice_in_one_batch_is_a_duplicate(tmp_path, tok):
    found = rules(tmp_path, tok, rec("c1", subject="Pantheon"), rec("c2", subject="PANTHEON", relation_id="p131",
                                                                        target_new="Milan"), ledger=())
    assert found == [(1, "duplicate_fact")]
    found = rules(tmp_path, tok, rec("c1", subject="Pantheon", relation_id=None),
                  rec("c2", subject="Pantheon ", relation_id=None, target_new="Milan"), ledger=())
    assert found == [(1, "duplicate_fact")]


def test_same_answer_in_another_unicode_form_is_already_applied(tmp_path, tok):
    assert rules(tmp_path, tok, rec("c1", target_new="\uff2dilan")) == [(0, "already_applied")]


def test_a_missing_relation_id_is_a_warning_only(tmp_path, tok):
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(rec("c1", subject="Pantheon", relation_id=None)) + "\n", encoding="utf-8")
    v = validate_batch(path, tok, ())
    assert v.passed and [(w.rule, w.severity) for w in v.warnings] == [("relation_id_missing", "warn")]


@pytest.mark.parametrize(("a", "b"), [("\u041a\u0418\u0415\u0412", "\u043a\u0438\u0435\u0432"),  # KIEV in Cyrillic
                                      ("\u0391\u0398\u0397\u039d\u0391", "\u03b1\u03b8\u03b7\u03bd\u03b1")])
def test_folding_look_alikes_keeps_case_insensitivity(a, b):
    assert fold(a, confusables=True) == fold(b, confusables=True)
