"""Checkpoint integrity: every file of a checkpoint has a recorded sha256, checked on every read.

``write_checkpoint`` records the sha256 of ``deltas.safetensors`` and ``state.safetensors`` in
the manifest (``files``); the night's ``promote`` ledger line records all three, the
manifest's included. Loading, rollback, promote, ``nas status --verify`` and ``nas audit``
call :func:`verify_checkpoint`, which refuses a checkpoint whose bytes differ from either
record with a one-line :class:`CheckpointTampered` naming the file and both hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.io import sha256_file

TENSOR_FILES = ("deltas.safetensors", "state.safetensors")
MANIFEST = "manifest.json"
FILES = (*TENSOR_FILES, MANIFEST)


class CheckpointTampered(ValueError):
    """A checkpoint file does not hash to what was recorded for it (one-line message)."""


def file_hashes(folder: Path, names: tuple[str, ...] = FILES) -> dict[str, str]:
    """``{name: sha256}`` of the checkpoint's files (streamed)."""
    return {name: sha256_file(Path(folder) / name) for name in names}


def _mismatch(folder: Path, name: str, actual: str, recorded: str, where: str) -> CheckpointTampered:
    return CheckpointTampered(f"checkpoint {Path(folder).name}: {name} hashes to {actual}, {where} recorded {recorded}"
                              " (the file was altered; restore it with `dvc pull data/checkpoints.dvc`)")


def read_verified(folder: Path, recorded: Mapping[str, str] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bytes of every checkpoint file and the parsed manifest, each checked against the
    manifest's ``files`` and against ``recorded`` (the ledger's, when given).

    The bytes are read once and the caller parses these bytes, so what was checked is what
    is loaded. A checkpoint written before file hashes existed has no ``files``: it is
    checked against ``recorded`` only.
    """
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint: {name} is missing")
    data = {name: (folder / name).read_bytes() for name in FILES}
    actual = {name: hashlib.sha256(blob).hexdigest() for name, blob in data.items()}
    for name, want in (recorded or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, "the ledger")
    manifest = _parse_manifest(folder, data[MANIFEST])
    for name, want in (manifest.get("files") or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, MANIFEST)
    return data, manifest


def verify_checkpoint(folder: Path, recorded: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check every file of the checkpoint against both records (as :func:`read_verified`, but
    the tensor files are hashed in chunks, never held); returns the manifest."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint: {name} is missing")
    blob = (folder / MANIFEST).read_bytes()  # small; parsed from the very bytes hashed
    actual = {**file_hashes(folder, TENSOR_FILES), MANIFEST: hashlib.sha256(blob).hexdigest()}
    for name, want in (recorded or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, "the ledger")
    manifest = _parse_manifest(folder, blob)
    for name, want in (manifest.get("files") or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, MANIFEST)
    return manifest


def _parse_manifest(folder: Path, blob: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointTampered(f"checkpoint {folder.name}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointTampered(f"checkpoint {folder.name}: {MANIFEST} is not a JSON object")
    return manifest


__all__ = ["FILES", "MANIFEST", "TENSOR_FILES", "CheckpointTampered", "file_hashes", "read_verified",
           "verify_checkpoint"]
