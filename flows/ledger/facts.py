"""The facts the ledger holds: what earlier batches wrote into the model, one :class:`LedgerFact` each.

A night compares every new record with these facts (conflicts, re-applied facts, superseded
facts), using the one fact identity of :mod:`flows.ledger.identity`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.ledger.identity import FactIdentity, identity_of
from nas_core.requests import EditRequest


@dataclass(frozen=True)
class LedgerFact:
    """A fact already written into the model by an earlier batch.

    Attributes:
        subject: the subject as the request held it.
        relation: the request's relation id ("" when it had none).
        target_new: the answer that was written.
        case_id: the case id of the record that wrote it.
        batch_id: the batch that record came from.
        template: the request's prompt template.
    """

    subject: str
    relation: str
    target_new: str
    case_id: str
    batch_id: str
    template: str = ""

    def __post_init__(self) -> None:
        for name in ("subject", "target_new", "case_id", "batch_id"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value.strip()):
                raise ValueError(f"LedgerFact.{name} must be a non-empty string")
        if not (self.relation.strip() or self.template.strip()):
            raise ValueError("LedgerFact needs a relation or a template")

    def identity(self, confusables: bool = True) -> FactIdentity:
        """This fact's identity (:mod:`flows.ledger.identity`)."""
        return identity_of(self.subject, self.relation, self.template, confusables)

    @classmethod
    def from_request(cls, request: EditRequest, batch_id: str) -> LedgerFact:
        """The ledger entry for an applied ``request`` of batch ``batch_id``."""
        return cls(request.subject, request.relation_id, request.target_new, request.case_id, batch_id,
                   request.prompt)


__all__ = ["LedgerFact"]
