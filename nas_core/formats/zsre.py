"""zsRE, in MEND's layout: a question about a subject, its new and its true answer.

The question (``src``) is the filled prompt; its template is rebuilt like CounterFact's
EasyEdit layout does (:mod:`nas_core.formats.templates`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nas_core.formats._checker import MISSING, RecordChecker, as_records, convert
from nas_core.formats.report import ConversionReport
from nas_core.formats.templates import template_or_report
from nas_core.requests import EditRequest


def _zsre_record(record: Mapping[str, Any], c: RecordChecker) -> EditRequest | None:
    """One MEND-layout zsRE record (its case id comes from its position)."""
    c.case_id = f"zsre-{c.position}"
    subject = c.text(c.get(record, "subject", "subject", True), "subject")
    question = c.text(c.get(record, "src", "src", True), "src")
    target_new = c.text(c.get(record, "alt", "alt", True), "alt")
    template, subject = template_or_report(c, question, subject, "src")
    target_true = _zsre_true_answer(record, c)
    paraphrases = c.single_text(c.get(record, "rephrase", "rephrase", False), "rephrase")
    neighbours = c.neighbour_pair(
        c.get(record, "loc", "loc", False),
        c.get(record, "loc_ans", "loc_ans", False),
        "loc",
        "loc_ans",
    )
    return c.finish(
        c.case_id,
        template,
        subject,
        target_new,
        target_true,
        "",
        paraphrases,
        neighbours,
        (),
        paths={"prompt": "src", "target_new": "alt", "paraphrase_prompts": "rephrase"},
    )


def _zsre_true_answer(record: Mapping[str, Any], c: RecordChecker) -> str | None:
    """``answers[0]``, else (only when ``answers`` is absent) the MEND model's ``pred``."""
    answers = c.get(record, "answers", "answers", False)
    if answers is not MISSING:
        items = c.sequence(answers, "answers")
        if items is not None and len(items) > 0:
            return c.text(items[0], "answers[0]")
        if items is not None:
            c.add("empty_field", "answers", "answers is an empty list")
        return None
    if "pred" in record:
        return c.text(record["pred"], "pred")
    c.add("missing_field", "answers", "answers is missing (and there is no pred)")
    return None


def from_zsre_mend(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert zsRE records in the MEND layout.

    ``src`` (the question) becomes the template by replacing the subject with ``{}``
    (located like :func:`~nas_core.formats.counterfact.from_counterfact_easyedit`); the
    question is kept as is, so the answer follows its ``?`` after the space the tokenisation
    code adds. ``alt`` is the new answer, ``answers[0]`` the true one (``pred``, the MEND
    base model's prediction, only when ``answers`` is absent), ``rephrase`` the paraphrase,
    ``loc`` / ``loc_ans`` the neighbourhood prompt. Case ids are ``"zsre-{index}"`` with
    the 0-based index in ``records`` (so pass the whole file to keep ids stable). ``cond``
    is ignored.
    """
    return convert(as_records(records), _zsre_record, strict=False)
