"""Checks that need the model's tokenizer: what the parser cannot know about a record.

They run on the records the parser accepted, each given as ``(line position, request)``:
a text must be encodable at all (``unencodable_text``), each target must be one to
``max_target_tokens`` real tokens (``target_no_tokens``, ``target_too_many_tokens``), and
the subject's last token must be locatable in the filled prompt (``subject_not_located``),
exactly as the editors tokenise them (:mod:`nas_core.prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.rules import short
from nas_core.formats import RecordProblem
from nas_core.prompts import SubjectNotFoundError, subject_last_token
from nas_core.requests import EditRequest

_FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "relation_id")


def _texts(request: EditRequest) -> list[tuple[str, str]]:
    """Every text of ``request`` with its field path."""
    out = [(name, getattr(request, name)) for name in _FIELDS]
    out += [(f"paraphrase_prompts[{i}]", t) for i, t in enumerate(request.paraphrase_prompts)]
    for i, n in enumerate(request.neighbourhood_prompts):
        out += [(f"neighbourhood_prompts[{i}].prompt", n.prompt), (f"neighbourhood_prompts[{i}].target", n.target)]
    out += [(f"generation_prompts[{i}]", t) for i, t in enumerate(request.generation_prompts)]
    return out


def unencodable_problems(request: EditRequest, position: int) -> list[RecordProblem]:
    """Lone surrogates: valid JSON escapes that Python keeps but tokenizers reject with a TypeError."""
    problems = []
    for name, text in _texts(request):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "unencodable_text",
                    f"{name} holds the lone surrogate U+{ord(text[exc.start]):04X} at index {exc.start}",
                    name,
                )
            )
    return problems


def _special_ids(tok: Any) -> frozenset[int]:
    return frozenset(int(i) for i in getattr(tok, "all_special_ids", ()) or ())


def _real_token(tok: Any, token_id: int, special: frozenset[int]) -> bool:
    """Not a special token and not pure whitespace (the separate leading-space token of some BPEs)."""
    return token_id not in special and bool(tok.decode([token_id]).strip())


def target_problems(tok: Any, placed: Sequence[tuple[int, EditRequest]], s: ValidationSettings) -> list[RecordProblem]:
    """``target_no_tokens`` and ``target_too_many_tokens`` for both targets of every record.

    The ids are those of ``nas_core.prompts.target_ids`` (one leading space, no special
    tokens), computed for all targets in one batched call: one call per target took a
    quarter of a second per 1000 records.
    """
    special = _special_ids(tok)
    fields = [(position, request, name) for position, request in placed for name in ("target_new", "target_true")]
    texts = [" " + getattr(request, name).strip() for _, request, name in fields]
    encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    problems = []
    for (position, request, name), ids in zip(fields, encoded, strict=True):
        text = getattr(request, name)
        if not any(_real_token(tok, i, special) for i in ids):
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "target_no_tokens",
                    f"{name} {short(text)} tokenises (with its leading space) to no real token: ids {list(ids)}",
                    name,
                )
            )
        elif len(ids) > s.max_target_tokens:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "target_too_many_tokens",
                    f"{name} {short(text)} is {len(ids)} tokens long (at most {s.max_target_tokens})",
                    name,
                )
            )
    return problems


def _why_not_located(tok: Any, request: EditRequest, text: str, encoding: Any, special: frozenset[int]) -> str | None:
    """Why the subject's last token cannot be located in the filled prompt ``text`` (None: it can).

    ``encoding`` is the Rust backend's encoding of ``text`` (ids and character offsets), or
    None for a tokenizer without one.
    """
    start = request.prompt.index("{}")  # the parser guarantees exactly one
    end = start + len(request.subject)
    try:
        index = subject_last_token(tok, text, end)
    except SubjectNotFoundError as exc:
        return str(exc)
    if encoding is None:
        return None
    ids, offsets = encoding.ids, encoding.offsets
    first, last = offsets[index] if 0 <= index < len(offsets) else (0, 0)
    if not 0 <= index < len(ids) or ids[index] in special or not (first < end and last > start):
        return f"the token subject_last_token picks (index {index}) lies outside the subject"
    return None


def subject_problems(tok: Any, placed: Sequence[tuple[int, EditRequest]]) -> list[RecordProblem]:
    """``subject_not_located`` for every record whose subject's last token cannot be found.

    The filled prompt goes through ``nas_core.prompts.subject_last_token`` (what the editors
    call), catching its error. That helper only fails when the subject span encodes to
    nothing, so where the tokenizer reports character offsets (fast tokenizers) the token it
    picks must also overlap the subject: a normaliser that drops the subject's characters
    makes it pick the BOS or a prompt token. The bare prompt is the hardest case: the
    editors' context prefixes only put more text before the subject.
    """
    special = _special_ids(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    texts = [request.filled_prompt for _, request in placed]
    # The Rust backend encodes the whole list at once; same ids as tok(...), plus offsets.
    encoded = backend.encode_batch(texts, add_special_tokens=True) if backend is not None and texts else None
    problems = []
    for n, (position, request) in enumerate(placed):
        why = _why_not_located(tok, request, texts[n], None if encoded is None else encoded[n], special)
        if why is not None:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "subject_not_located",
                    f"subject {short(request.subject)} cannot be located in {short(texts[n], 100)}: {why}",
                    "subject",
                )
            )
    return problems


__all__ = ["subject_problems", "target_problems", "unencodable_problems"]
