"""Tokenisation helpers shared by keys, values and evaluation.

Everything here is chat-template free: prompts are plain text continued by the model.
Token sequences are built by concatenating ``prompt ids + target ids`` (never by
re-tokenising a joined string), so the edit and its evaluation see the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Short, neutral context prefixes. Averaging the key over them is the prefix-consistent
# fix of "The Fall of ROME" / r-ROME: the same averaged key is used everywhere, and the
# subject is never the first token of every prompt. A fixed list keeps runs deterministic
# and model-independent (ROME samples them from the model instead).
DEFAULT_CONTEXT_PREFIXES: tuple[str, ...] = (
    "",
    "The following is true. ",
    "Here is a fact. ",
    "I read this today. ",
    "According to the records, ",
    "It is well known that ",
)


class SubjectNotFoundError(ValueError):
    """The subject does not occur in the prompt, or its tokens cannot be located."""


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into the single ``{}`` of ``template``."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain exactly one '{{}}': {template!r}")
    return template.replace("{}", subject)


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens (BOS where it adds one)."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def target_ids(tok, target: str) -> list[int]:
    """Token ids of a target answer continuing a prompt: one leading space, no specials."""
    ids = list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def subject_last_token(tok, text: str, subject_end_char: int) -> int:
    """Index of the token that holds character ``subject_end_char - 1`` of ``text``.

    Uses cumulative encodes: the token count of ``text[:subject_end_char]`` minus one,
    checked against the full encoding. When a merge crosses the subject boundary (the
    subject's last characters fuse with what follows), the token holding the boundary
    is taken instead. Robust to a BOS token because both encodes add the same specials.
    """
    full = encode(tok, text)
    head = encode(tok, text[:subject_end_char])
    idx = len(head) - 1
    if idx < 0:
        raise SubjectNotFoundError(f"empty subject span in {text!r}")
    if full[: len(head)] == head:
        return idx
    # A merge across the boundary: walk back to the longest common prefix.
    common = 0
    for a, b in zip(full, head, strict=False):
        if a != b:
            break
        common += 1
    return min(common, len(full) - 1)


@dataclass(frozen=True)
class TokenisedPrompt:
    """A prompt (optionally with a target appended) as ids.

    Attributes:
        ids: token ids, prompt then target[:-1] when a target is given.
        subject_pos: index of the subject's last token.
        target_start: index of the first target token in the *labels* sense: the logits
            at ``target_start - 1 + j`` predict target token ``j``. Equals the prompt length.
        target: the target ids (possibly empty).
    """

    ids: tuple[int, ...]
    subject_pos: int
    target_start: int
    target: tuple[int, ...]


def tokenise(tok, prefix: str, template: str, subject: str, target: Sequence[int] = ()) -> TokenisedPrompt:
    """Tokenise ``prefix + template(subject)`` and append ``target[:-1]``."""
    text = prefix + fill(template, subject)
    start = len(prefix) + template.index("{}")
    pos = subject_last_token(tok, text, start + len(subject))
    prompt = encode(tok, text)
    ids = tuple(prompt) + tuple(target[:-1])
    return TokenisedPrompt(ids=ids, subject_pos=pos, target_start=len(prompt), target=tuple(target))


def tokenise_filled(tok, prompt: str, target: Sequence[int] = ()) -> TokenisedPrompt:
    """Tokenise an already filled prompt (no subject position: it is the last prompt token)."""
    ids = encode(tok, prompt)
    return TokenisedPrompt(
        ids=tuple(ids) + tuple(target[:-1]),
        subject_pos=len(ids) - 1,
        target_start=len(ids),
        target=tuple(target),
    )


def pad_batch(
    prompts: Sequence[TokenisedPrompt], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a batch.

    Returns:
        input_ids: (B, T) long, attention_mask: (B, T) long. Right padding keeps every real
        token at its natural position, so absolute indices stay valid.
    """
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
        mask[row, : len(p.ids)] = 1
    return ids, mask


def pad_token_id(tok) -> int:
    """A pad id for right padding (masked out, so any id works; prefer the tokenizer's own)."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return 0
