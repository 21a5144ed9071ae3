"""Fact identity: when two records are about the same fact, in one place for the whole product.

A fact is *what the model answers about a subject for one question*. Two records are the
same fact when their subjects are equal after :func:`nas_core.text.fold` (NFKC, casefold,
collapsed whitespace, format characters removed, look-alike letters folded by policy) and

* both carry a relation id and the relation ids are equal after the same folding
  (``P17`` is ``p17``), or
* their prompt templates are equal after folding (the same question about the same subject
  is the same fact whatever relation id, if any, either record gives).

A record without a relation id is therefore matched by its template only: a rephrased
template of the same fact is not recognised, which validation reports as a warning
(``relation_id_missing``). The ledger conflict check, the within-batch duplicate check, the
retention set and the superseded facts all use :func:`same_fact` (docs/FACT_SCHEMA.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from nas_core.text import fold

T = TypeVar("T")


@dataclass(frozen=True)
class FactIdentity:
    """The folded parts of a fact that decide its identity (see the module docstring)."""

    subject: str
    relation: str  # "" when the record has no relation id
    template: str

    def same_fact(self, other: FactIdentity) -> bool:
        """Whether ``other`` is about the same fact."""
        if self.subject != other.subject:
            return False
        if self.relation and other.relation and self.relation == other.relation:
            return True
        return self.template == other.template

    def describe(self) -> str:
        """A short readable form for messages."""
        about = f"relation {self.relation!r}" if self.relation else f"template {self.template!r}"
        return f"subject {self.subject!r}, {about}"


def identity_of(subject: str, relation_id: str, prompt: str, confusables: bool = True) -> FactIdentity:
    """The identity of the fact (``subject``, ``relation_id``, prompt template ``prompt``)."""
    return FactIdentity(fold(subject, confusables), fold(relation_id, confusables), fold(prompt, confusables))


def last_match(identity: FactIdentity, candidates: Iterable[tuple[FactIdentity, T]]) -> T | None:
    """The value of the last candidate about the same fact as ``identity`` (None if none)."""
    found = None
    for other, value in candidates:
        if identity.same_fact(other):
            found = value
    return found


def latest_facts(items: Sequence[T], key: Callable[[T], FactIdentity]) -> list[T]:
    """``items`` in order, each dropped when a later item is about the same fact.

    The model holds the last answer written for a fact, so a retention set or a ledger's
    current facts keep only the latest record of each.
    """
    keys = [key(item) for item in items]
    later: dict[str, list[FactIdentity]] = {}  # by folded subject: only those can match
    kept = []
    for item, k in zip(reversed(items), reversed(keys), strict=True):
        group = later.setdefault(k.subject, [])
        if not any(k.same_fact(other) for other in group):
            kept.append(item)
        group.append(k)
    return kept[::-1]


__all__ = ["FactIdentity", "last_match", "identity_of", "latest_facts"]
