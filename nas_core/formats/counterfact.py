"""CounterFact, in its two layouts: ROME's original one and EasyEdit's (MEND's) flat one.

Both are lenient about text (CounterFact paraphrases contain newlines) and strip every text;
targets lose their leading space (the tokenisation code adds it back). The EasyEdit layout
stores the prompt filled, so its template is rebuilt (:mod:`nas_core.formats.templates`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nas_core.formats._checker import MISSING, RecordChecker, as_records, convert
from nas_core.formats.report import ConversionReport
from nas_core.formats.templates import template_or_report
from nas_core.requests import EditRequest, NeighbourhoodPrompt

# --------------------------------------------------------------------------------------
# ROME layout
# --------------------------------------------------------------------------------------

_RW = "requested_rewrite"


def _rome_record(record: Mapping[str, Any], c: RecordChecker) -> EditRequest | None:
    """One ROME-layout record: the rewrite's fields, then the record's prompt lists."""
    case_id = c.benchmark_case_id(record)
    rewrite = c.get(record, _RW, _RW, required=True)
    if rewrite is MISSING or c.mapping(rewrite, _RW) is None:
        return None
    prompt = c.text(c.get(rewrite, "prompt", f"{_RW}.prompt", True), f"{_RW}.prompt")
    subject = c.text(c.get(rewrite, "subject", f"{_RW}.subject", True), f"{_RW}.subject")
    targets = {key: _rome_target(rewrite, key, c) for key in ("target_new", "target_true")}
    relation_id = _rome_relation_id(rewrite, c)
    paraphrases = c.texts(c.get(record, "paraphrase_prompts", "", False), "paraphrase_prompts")
    generations = c.texts(c.get(record, "generation_prompts", "", False), "generation_prompts")
    neighbours = _rome_neighbours(record, targets["target_true"], c)
    return c.finish(
        case_id,
        prompt,
        subject,
        targets["target_new"],
        targets["target_true"],
        relation_id,
        paraphrases,
        neighbours,
        generations,
        paths={"prompt": f"{_RW}.prompt", "target_new": f"{_RW}.target_new.str"},
    )


def _rome_target(rewrite: Mapping[str, Any], key: str, c: RecordChecker) -> str | None:
    """``requested_rewrite.<key>.str``, or a bare string in place of ``{"str": ...}``."""
    value = c.get(rewrite, key, f"{_RW}.{key}", True)
    if value is MISSING:
        return None
    if isinstance(value, str):  # tolerate a bare string instead of {"str": ...}
        return c.text(value, f"{_RW}.{key}")
    if c.mapping(value, f"{_RW}.{key}") is None:
        return None
    return c.text(c.get(value, "str", f"{_RW}.{key}.str", True), f"{_RW}.{key}.str")


def _rome_relation_id(rewrite: Mapping[str, Any], c: RecordChecker) -> str | None:
    """The optional relation id, stripped (``""`` when absent)."""
    relation = c.get(rewrite, "relation_id", f"{_RW}.relation_id", False)
    if relation is MISSING:
        return ""
    if isinstance(relation, str):
        return relation.strip()
    c.add("wrong_type", f"{_RW}.relation_id", f"{_RW}.relation_id must be a string")
    return None


def _rome_neighbours(
    record: Mapping[str, Any], target_true: str | None, c: RecordChecker
) -> tuple[NeighbourhoodPrompt, ...] | None:
    """``neighborhood_prompts``: strings answered by ``target_true``, or prompt/target objects."""
    raw = c.sequence(c.get(record, "neighborhood_prompts", "", False), "neighborhood_prompts")
    if raw is None:
        return None
    items: list[NeighbourhoodPrompt | None] = []
    for i, item in enumerate(raw):
        path = f"neighborhood_prompts[{i}]"
        if isinstance(item, Mapping):  # some exports store {"prompt": ..., "target": ...}
            text = c.text(c.get(item, "prompt", f"{path}.prompt", True), f"{path}.prompt")
            answer = item.get("target", target_true)
            answer = c.text(answer, f"{path}.target") if answer is not None else None
        else:
            text, answer = c.text(item, path), target_true
        ok = text is not None and answer is not None
        items.append(NeighbourhoodPrompt(text, answer) if ok else None)  # type: ignore[arg-type]
    if all(item is not None for item in items):
        return tuple(items)  # type: ignore[arg-type]
    return None


def from_counterfact_rome(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert CounterFact records in the original ROME layout.

    Reads ``case_id`` and ``requested_rewrite`` (``prompt`` with ``{}``, ``subject``,
    ``target_new.str``, ``target_true.str``, ``relation_id``) plus the optional lists
    ``paraphrase_prompts``, ``neighborhood_prompts`` (their answer is ``target_true``) and
    ``generation_prompts``. ``attribute_prompts`` (answer ``target_new``: not a locality
    check) and other keys are ignored. Targets lose their leading space.
    """
    return convert(as_records(records), _rome_record, strict=False)


# --------------------------------------------------------------------------------------
# EasyEdit layout
# --------------------------------------------------------------------------------------


def _easyedit_record(record: Mapping[str, Any], c: RecordChecker) -> EditRequest | None:
    """One EasyEdit-layout record: filled prompt, one optional paraphrase and neighbour."""
    case_id = c.benchmark_case_id(record)
    filled = c.text(c.get(record, "prompt", "prompt", True), "prompt")
    subject = c.text(c.get(record, "subject", "subject", True), "subject")
    target_new = c.text(c.get(record, "target_new", "target_new", True), "target_new")
    target_true = c.text(c.get(record, "ground_truth", "ground_truth", True), "ground_truth")
    template, subject = template_or_report(c, filled, subject, "prompt")
    rephrase = c.get(record, "rephrase_prompt", "rephrase_prompt", False)
    if isinstance(rephrase, (list, tuple)):
        paraphrases = c.texts(rephrase, "rephrase_prompt")
    else:
        paraphrases = c.single_text(rephrase, "rephrase_prompt")
    neighbours = c.neighbour_pair(
        c.get(record, "locality_prompt", "locality_prompt", False),
        c.get(record, "locality_ground_truth", "locality_ground_truth", False),
        "locality_prompt",
        "locality_ground_truth",
    )
    return c.finish(
        case_id,
        template,
        subject,
        target_new,
        target_true,
        "",
        paraphrases,
        neighbours,
        (),
        paths={"paraphrase_prompts": "rephrase_prompt"},
    )


def from_counterfact_easyedit(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert CounterFact records in the EasyEdit/MEND layout.

    Reads ``case_id``, ``prompt`` (filled), ``subject``, ``target_new``, ``ground_truth``
    and the optional ``rephrase_prompt`` (one paraphrase) and ``locality_prompt`` /
    ``locality_ground_truth`` (one neighbourhood prompt). The template is rebuilt by
    locating the subject in the filled prompt (see
    :func:`~nas_core.formats.templates.template_from_filled`: first
    whole-word exact match, then any exact match, then case-insensitively); a record whose
    subject cannot be found fails with ``subject_not_found``. The layout has no relation id.
    """
    return convert(as_records(records), _easyedit_record, strict=False)
