"""The inbox: which entries are batches, and each batch read exactly once.

A night reads a batch file once into memory (:func:`take_snapshot`), validates and edits
those bytes, and writes *those bytes* to ``accepted/`` or quarantine (:func:`store`), so
what the ledger's hash names is what the model got, even when someone rewrites the inbox
file mid-night or the entry is a symlink whose target changes later. Only complete regular
``*.jsonl`` files are batches; anything else (a ``.part`` upload, a directory or FIFO named
``x.jsonl``, a dangling link, a hidden file) is listed in :class:`InboxScan` and left alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from flows.io import CHUNK, atomic_write_bytes, atomic_write_chunks, sha256_file

BATCH_SUFFIX = ".jsonl"


class NotARegularFile(OSError):
    """The inbox entry is no longer a regular file (replaced by a directory, FIFO, ...)."""


@dataclass(frozen=True)
class Ignored:
    """An inbox entry that is not a batch, and why."""

    name: str
    why: str


@dataclass(frozen=True)
class InboxScan:
    """The batches of an inbox in name order, and everything else found there."""

    batches: tuple[Path, ...]
    ignored: tuple[Ignored, ...]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def scan_inbox(inbox: Path) -> InboxScan:
    """Classify every entry of ``inbox`` (created when missing); never opens a file."""
    inbox.mkdir(parents=True, exist_ok=True)
    batches: list[Path] = []
    ignored: list[Ignored] = []
    for entry in sorted(inbox.iterdir()):
        name = entry.name
        if name.startswith("."):
            ignored.append(Ignored(name, "a hidden file (an upload in progress or a tool's file)"))
            continue
        if not name.endswith(BATCH_SUFFIX):
            ignored.append(Ignored(name, f"not a {BATCH_SUFFIX} file (a partial upload stays until it is renamed)"))
            continue
        try:
            mode = entry.stat().st_mode  # follows a symlink: a link to a regular file is a batch
        except OSError:
            ignored.append(Ignored(name, "a symlink whose target does not exist"))
            continue
        if stat.S_ISREG(mode):
            batches.append(entry)
        else:
            ignored.append(Ignored(name, _kind(mode)))
    return InboxScan(tuple(batches), tuple(ignored))


@dataclass(frozen=True)
class BatchSnapshot:
    """The bytes of one inbox batch as the night read them.

    Attributes:
        path: the inbox entry.
        sha256: hex digest of the bytes read.
        size: number of bytes read.
        data: the bytes, or ``None`` when the file was larger than the limit (then only
            hashed, in chunks, never held in memory).
        link_target: where the entry pointed when it was a symlink, else ``None``.
    """

    path: Path
    sha256: str
    size: int
    data: bytes | None
    link_target: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def take_snapshot(path: Path, max_bytes: int) -> BatchSnapshot:
    """Read ``path`` once: its bytes (at most ``max_bytes``; beyond, only a streamed hash).

    Opens without blocking and checks the open file, so an entry swapped for a FIFO or a
    directory after the scan raises :class:`NotARegularFile` instead of hanging.
    """
    path = Path(path)
    link = os.readlink(path) if path.is_symlink() else None
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        digest, kept, size = hashlib.sha256(), [], 0
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            if size <= max_bytes:
                kept.append(chunk)
            elif kept:
                kept = []  # grew past the limit: stop holding it
    return BatchSnapshot(path, digest.hexdigest(), size, b"".join(kept) if size <= max_bytes else None, link)


def _open_regular(path: Path) -> int:
    """A read-only fd of ``path`` if it is a regular file; never blocks (a FIFO), never leaks."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, f"{path} is {_kind(mode)}, not a batch file")
    return fd


def _sha256_regular(path: Path) -> str:
    """sha256 of ``path`` read through :func:`_open_regular` (NotARegularFile otherwise)."""
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store(snapshot: BatchSnapshot, target: Path) -> str:
    """Write the snapshot's bytes to ``target`` atomically and check them; returns the sha256 written.

    A snapshot too large to hold is moved (a regular file on the same file system) or
    copied in chunks (a symlink's target, another file system); its hash is then the hash
    of what arrived, which the caller records.
    """
    target = Path(target)
    if snapshot.data is not None:
        written = atomic_write_bytes(target, snapshot.data)
        if written != snapshot.sha256 or sha256_file(target) != snapshot.sha256:
            raise RuntimeError(f"{target}: the bytes written do not hash to {snapshot.sha256}")
        return written
    target.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.link_target is None:
        try:
            os.replace(snapshot.path, target)
            return sha256_file(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    with snapshot.path.open("rb") as src:
        return atomic_write_chunks(target, iter(lambda: src.read(CHUNK), b""))


def release(snapshot: BatchSnapshot) -> str | None:
    """Remove the inbox entry after its bytes were stored; returns a warning when it is kept.

    A symlink is removed (its bytes were kept; its target is not ours). A regular file is
    removed only if it still holds the snapshot's bytes: rewritten mid-night, it is new
    content, which stays in the inbox as a batch of its own for the next night.
    """
    path = snapshot.path
    if not os.path.lexists(path):
        return None  # moved by store()
    if path.is_symlink():
        path.unlink()
        return None
    try:
        current = _sha256_regular(path)
    except OSError as exc:  # NotARegularFile included: a FIFO swapped in is left alone
        return f"{path.name}: could not be re-read after the night stored it ({exc}); left in the inbox"
    if current != snapshot.sha256:
        return (f"{path.name} was rewritten while the night ran (sha256 {snapshot.sha256[:12]} was edited, the file "
                f"now holds {current[:12]}): the new content stays in the inbox as a new batch")
    path.unlink()
    return None


__all__ = ["BatchSnapshot", "Ignored", "InboxScan", "NotARegularFile", "release", "scan_inbox", "store",
           "take_snapshot"]
