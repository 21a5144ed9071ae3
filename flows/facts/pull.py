"""Pull the night's fact batches from configured sources into the inbox (params.yaml ``sources``).

A ``files`` source is an fsspec URL prefix (``file://``, ``s3://``, ``ssh://``, ``https://``...)
and a glob pattern; a ``datasets`` source is a split ``datasets.load_dataset`` reads (a local
folder or file; a hub id only when the user writes one), pulled as one batch. Each batch is read
once, written into the inbox under its own name (a free one if the inbox holds another file by
that name) and recorded in the ledger as a ``pull`` line with its provenance: source, path,
revision (the store's ETag, else its mtime and size; a dataset's fingerprint), sha256 and time.
A batch whose (source, path, revision) or whose bytes were pulled before is never pulled again.
A source that cannot be listed or read is retried, then the night stops with
:class:`SourceUnavailable` before it edits anything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config.params import SourceParams
from flows.io import atomic_write_bytes, free_target
from flows.ledger.records import Ledger

log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """A configured source could not be listed or read after its retries; nothing was edited."""


@dataclass(frozen=True)
class Pulled:
    """One file written into the inbox tonight."""

    source: str
    path: str
    inbox_name: str
    sha256: str


def revision(info: dict[str, Any]) -> str:
    """The store's version of a file: its ETag where it has one, else mtime and size."""
    for key in ("ETag", "etag", "e_tag"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return f"mtime:{mtime}:size:{info.get('size')}"


def _retrying(source: SourceParams, what: str, action: Callable[[], Any]) -> Any:
    for attempt in range(1, source.retries + 2):
        try:
            return action()
        except (OSError, TimeoutError, ConnectionError) as err:
            if attempt > source.retries:
                raise SourceUnavailable(f"source {source.name!r} ({source.url}): {what} failed {attempt} times, "
                                        f"last: {type(err).__name__}: {err}; nothing was edited tonight") from err
            log.warning("source %r: %s failed (%s), retry %d of %d in %g s", source.name, what, err, attempt,
                        source.retries, source.retry_delay_s)
            time.sleep(source.retry_delay_s)
    raise AssertionError("unreachable")


def pull_source(source: SourceParams, inbox: Path, ledger: Ledger, max_file_bytes: int) -> list[Pulled]:
    """Every new batch of ``source`` into ``inbox``, each recorded in ``ledger`` (a ``pull`` line)."""
    if source.kind == "datasets":
        return _pull_dataset(source, inbox, ledger)
    return _pull_files(source, inbox, ledger, max_file_bytes)


def _seen(ledger: Ledger) -> tuple[set[tuple], set[str]]:
    """(source, path, revision) of every pull so far, and the sha256 of every batch the ledger has."""
    entries = ledger.entries()
    return ({(e.get("source"), e.get("path"), e.get("revision")) for e in entries if e["event"] == "pull"},
            {e.get("file_sha256") for e in entries})


def _store(source: SourceParams, inbox: Path, ledger: Ledger, name: str, rel: str, rev: str, data: bytes) -> Pulled:
    target = free_target(Path(name), inbox)
    atomic_write_bytes(target, data)
    digest = hashlib.sha256(data).hexdigest()
    ledger.append("pull", source=source.name, url=source.url, path=rel, revision=rev, file_sha256=digest,
                  inbox_name=target.name, bytes=len(data))
    return Pulled(source.name, rel, target.name, digest)


def _pull_dataset(source: SourceParams, inbox: Path, ledger: Ledger) -> list[Pulled]:
    """A ``datasets`` split as one batch of fact records, named after the source and its fingerprint."""
    import json

    import datasets

    ds = _retrying(source, "loading the dataset", lambda: datasets.load_dataset(source.url, split=source.split))
    rev = f"fingerprint:{ds._fingerprint}"
    seen_revisions, seen_bytes = _seen(ledger)
    if (source.name, source.split, rev) in seen_revisions:
        return []
    rows = [{k: v for k, v in row.items() if v is not None} for row in ds]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if hashlib.sha256(data).hexdigest() in seen_bytes:
        return []
    return [_store(source, inbox, ledger, f"{source.name}-{ds._fingerprint[:12]}.jsonl", source.split, rev, data)]


def _pull_files(source: SourceParams, inbox: Path, ledger: Ledger, max_file_bytes: int) -> list[Pulled]:
    """Every new file under an fsspec URL prefix that matches the source's pattern."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source.url)
    entries = _retrying(source, "listing", lambda: fs.find(root, detail=True))
    seen_revisions, seen_bytes = _seen(ledger)
    pulled = []
    for path, info in sorted(entries.items()):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" or not fnmatch.fnmatch(name, source.pattern):
            continue
        rel = path[len(root.rstrip("/")):].lstrip("/") or name
        rev = revision(info)
        if (source.name, rel, rev) in seen_revisions:
            continue
        if (info.get("size") or 0) > max_file_bytes:
            log.warning("source %r: %s is %s bytes, over validation.max_file_bytes: not pulled", source.name, rel,
                        info.get("size"))
            continue
        data = _retrying(source, f"reading {rel}", lambda p=path: fs.cat_file(p))
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_bytes:
            log.info("source %r: %s has the bytes of a batch the ledger already has: not pulled", source.name, rel)
            continue
        seen_bytes.add(digest)
        pulled.append(_store(source, inbox, ledger, name, rel, rev, data))
    return pulled
