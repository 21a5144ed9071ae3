"""A champion's lineage: the accepted batches that built it, checked against the ledger, and
the facts it holds.

The night (its ledger checks and retention set), the DVC replay and the evaluate stage all
read the lineage through these functions, so they see the same requests in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.ledger.identity import FactIdentity, identity_of, latest_facts
from flows.ledger.records import Ledger
from flows.paths import Roots
from nas_core.formats import SchemaPolicy, parse_fact_jsonl
from nas_core.requests import EditRequest


def _parse_accepted(path: Path, data: bytes, policy: SchemaPolicy | None) -> list[EditRequest]:
    """The requests of an accepted batch's bytes, in file order: the ``validation.requests`` the
    flow applied (decoded as the night decodes; an accepted batch has no refusing problem)."""
    report = parse_fact_jsonl(data.decode("utf-8"), policy)
    if report.problems:
        raise ValueError(f"accepted batch {path} no longer parses cleanly: {report.problems[0]}")
    return list(report.requests)


@dataclass(frozen=True)
class LineageBatch:
    """One promote entry of the champion's lineage with the requests the flow applied."""

    version: str
    batch_id: str
    path: Path
    requests: tuple[EditRequest, ...]
    request_ids: tuple[str, ...]
    skipped_ids: tuple[str, ...]
    weights_hash: str
    edits_so_far: int
    batch_size: int
    entry: dict[str, Any] = field(repr=False, compare=False)


def champion_of(ledger: Ledger) -> tuple[str | None, str | None]:
    """(version, weights hash) of the ledger's champion; (None, None) for the base model."""
    champ = ledger.champion()
    if champ is None:
        return None, None
    version = champ["version"]
    whash = champ.get("weights_hash")
    if whash is None or champ["event"] != "promote":
        promoted = ledger.promotion(version)
        whash = promoted.get("weights_hash") if promoted else whash
    return version, whash


def lineage_batches(ledger: Ledger, version: str | None, roots: Roots, batch_size: int,
                    policy: SchemaPolicy | None = None) -> list[LineageBatch]:
    """The accepted batches that built ``version``, oldest first, checked against the ledger.

    Each batch file must still hash to the ledger's ``file_sha256`` and its records, minus
    the ledger's ``skipped_ids``, must be the ledger's ``request_ids`` in order. A promote
    entry's ``edit_batch_size`` (when the flow records it) wins over ``batch_size``.
    """
    out = []
    for entry in ledger.lineage(version) if version else []:
        path = roots.resolve(entry["accepted_path"])
        if not path.is_file():
            raise FileNotFoundError(f"{entry['version']}: accepted batch {path} is missing (dvc pull?)")
        data = path.read_bytes()  # one read: the bytes hashed are the bytes parsed
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["file_sha256"]:
            raise ValueError(f"{entry['version']}: {path} hashes to {digest[:12]}, the ledger recorded "
                             f"{entry['file_sha256'][:12]}: the accepted batch was altered")
        requests = _parse_accepted(path, data, policy)
        skipped = tuple(entry.get("skipped_ids", ()))
        applied = [r.case_id for r in requests if r.case_id not in set(skipped)]
        if applied != list(entry["request_ids"]):
            raise ValueError(f"{entry['version']}: the records of {path} minus skipped_ids are not the ledger's "
                             f"request_ids in order ({len(applied)} vs {len(entry['request_ids'])})")
        out.append(LineageBatch(entry["version"], entry["batch_id"], path, tuple(requests),
                                tuple(entry["request_ids"]), skipped, entry["weights_hash"],
                                int(entry.get("edits_so_far", 0)), int(entry.get("edit_batch_size") or batch_size),
                                entry))
    return out


def held_facts(batches: Sequence[LineageBatch], confusables: bool) -> list[tuple[EditRequest, str]]:
    """``(request, batch id)`` of every fact the champion holds, oldest first: a later record
    of the same fact (:mod:`flows.ledger.identity`) replaces an earlier one. The night's retention
    set and ledger facts (``flows.refresh.steps.lineage_requests``) are this list."""
    pairs = [(r, b.batch_id) for b in batches for r in b.requests if r.case_id in set(b.request_ids)]
    return latest_facts(pairs, lambda pair: _identity(pair[0], confusables))


def _identity(r: EditRequest, confusables: bool) -> FactIdentity:
    return identity_of(r.subject, r.relation_id, r.prompt, confusables)


def retention_set(held: Sequence[EditRequest], new: Sequence[EditRequest], confusables: bool) -> list[EditRequest]:
    """What a candidate's retention is scored on: the held facts no new request re-states
    (a passed batch supersedes them), then the whole new batch (skipped requests too)."""
    keys = [_identity(r, confusables) for r in new]
    return [r for r in held if not any(_identity(r, confusables).same_fact(k) for k in keys)] + list(new)


def retention_requests(batches: Sequence[LineageBatch], confusables: bool) -> list[EditRequest]:
    """The :func:`retention_set` the flow scored when it promoted the last of ``batches``."""
    if not batches:
        return []
    held = [r for r, _ in held_facts(batches[:-1], confusables)]
    return retention_set(held, batches[-1].requests, confusables)
