"""Prompt templates from filled prompts: the layouts that store the prompt with its subject in.

CounterFact's EasyEdit layout and zsRE's MEND layout give the prompt filled
(``"The mother tongue of Danielle Darrieux is"``) and the subject apart; an
:class:`~nas_core.requests.EditRequest` needs the template (``"The mother tongue of {} is"``).
Both layouts rebuild it here, the same way.
"""

from __future__ import annotations

import re

from nas_core.formats._checker import RecordChecker


def _locate_subject(filled: str, subject: str) -> tuple[int, int] | None:
    """Span of ``subject`` in ``filled``, or ``None``.

    Preference order: an exact match standing as a whole word (no letter or digit right
    before or after it), then any exact match, then the same two case-insensitively; within
    each, the *first* occurrence. CounterFact and zsRE put the subject early and follow it
    with the relation phrase that predicts the answer (399 of the 500 ROME templates start
    with ``{}``; none repeats the subject), and a later occurrence is far more often part of
    another name ("Norway" in "Denmark-Norway") than the subject again. The whole-word
    preference keeps "Rome" from matching inside "Romeo".
    """
    pattern = re.escape(subject)
    for flags in (0, re.IGNORECASE):
        spans = [m.span() for m in re.finditer(pattern, filled, flags)]
        for start, end in spans:
            before = filled[start - 1] if start > 0 else " "
            after = filled[end] if end < len(filled) else " "
            if not before.isalnum() and not after.isalnum():
                return start, end
        if spans:
            return spans[0]
    return None


def template_from_filled(filled: str, subject: str) -> tuple[str, str] | None:
    """Turn a filled prompt back into ``(template, subject as spelled in the prompt)``.

    The subject is located as described in :func:`_locate_subject`; on a case-insensitive
    match the prompt's own spelling becomes the subject, so ``template.replace("{}",
    subject)`` reproduces ``filled`` exactly. Returns ``None`` when the subject is absent.
    """
    if not subject:
        return None
    span = _locate_subject(filled, subject)
    if span is None:
        return None
    start, end = span
    return filled[:start] + "{}" + filled[end:], filled[start:end]


def template_or_report(
    checker: RecordChecker, filled: str | None, subject: str | None, path: str
) -> tuple[str | None, str | None]:
    """``(template, subject)`` of a record's filled prompt; ``subject_not_found`` when absent.

    ``filled`` and ``subject`` are ``None`` where reading them already failed; the template
    is then ``None`` too, with nothing more reported.
    """
    if filled is None or subject is None:
        return None, subject
    found = template_from_filled(filled, subject)
    if found is None:
        checker.add(
            "subject_not_found", path, f"subject {subject!r} does not occur in {path} {filled!r}"
        )
        return None, subject
    return found
