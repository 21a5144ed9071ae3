"""File primitives every part of the product shares: streamed hashing, atomic writes, cache keys, time.

Hashes are always streamed (a file is never read whole to hash it, whatever its size), and
every write goes to a temporary file in the target's folder that is fsynced and renamed, so
a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import io
import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to ``path`` atomically (temp file + fsync + rename); returns their sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256."""
    return atomic_write_chunks(path, [data])


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename (never a half-written file)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=True) + "\n")
    return Path(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_csv(path: Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` under ``header`` as CSV (``\n`` line ends), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def code_version(repo: Path | None = None) -> str:
    """The git commit of the code (``-dirty`` with uncommitted changes), or ``unknown``."""
    cwd = repo or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def loaded_code_version() -> str:
    """:func:`code_version` asked once per process, at the first call: the code a long run loaded.

    A study calls it when it starts, so that a commit made while it runs (the working tree is
    the same folder) does not relabel the points it measures afterwards with code it never ran."""
    return code_version()


__all__ = ["CHUNK", "LockHeld", "atomic_write_bytes", "atomic_write_chunks", "atomic_write_text",
           "code_version", "digest", "exclusive_lock", "loaded_code_version", "now", "read_json", "sha256_file",
           "this_process", "write_csv", "write_json"]


def free_target(path: Path, folder: Path) -> Path:
    """Where ``path`` would go in ``folder`` without overwriting anything (``name-2.jsonl`` etc.)."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 2
    while target.exists():
        target, n = folder / f"{path.stem}-{n}{path.suffix}", n + 1
    return target


def this_process() -> str:
    """``pid N on HOST``: how a lock or a request names the process that made it."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class LockHeld(RuntimeError):
    """Another process holds an :func:`exclusive_lock`; ``holder`` is what it wrote in the file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking ``flock`` on ``path`` for the block. The file names the holder
    (pid, host, since when); the OS releases the lock when the holder dies, so a crash never
    leaves a stale one.

    Raises:
        LockHeld: another process (or another open of the file) holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, path.read_text(encoding="utf-8").strip() or "an unknown process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{this_process()} since {now()}".encode())
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock
