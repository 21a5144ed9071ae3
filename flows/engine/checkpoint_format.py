"""The files of a checkpoint folder and their verification (format 1 and 2, the chain's pointers).

:mod:`flows.engine.checkpoints` documents the formats.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.engine.increments import INCREMENT
from flows.io import sha256_file

DELTAS, STATE, MANIFEST = "deltas.safetensors", "state.safetensors", "manifest.json"
FORMAT = "nas-checkpoint/2"
SNAPSHOT_FILES = (DELTAS, STATE)


class CheckpointTampered(ValueError):
    """A checkpoint file does not hash to what was recorded for it (one-line message)."""


def snapshot_kind(manifest: Mapping[str, Any]) -> str | None:
    """``"end"`` (D and state after the increment), ``"start"`` (before it) or None (no snapshot)."""
    if manifest.get("format", "nas-checkpoint/1") == "nas-checkpoint/1":
        return "end"
    return manifest.get("snapshot")


def tensor_files(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensor files a checkpoint with this manifest holds."""
    if manifest.get("format", "nas-checkpoint/1") == "nas-checkpoint/1":
        return SNAPSHOT_FILES
    return (INCREMENT, *(SNAPSHOT_FILES if snapshot_kind(manifest) else ()))


def file_hashes(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{name: sha256}`` of the checkpoint's files (streamed); all of them, the manifest's
    included, unless ``names`` are given."""
    folder = Path(folder)
    if names is None:
        manifest = _parse_manifest(folder, (folder / MANIFEST).read_bytes())
        names = (*tensor_files(manifest), MANIFEST)
    return {name: sha256_file(folder / name) for name in names}


def _mismatch(folder: Path, name: str, actual: str, recorded: str, where: str) -> CheckpointTampered:
    return CheckpointTampered(f"checkpoint {Path(folder).name}: {name} hashes to {actual}, {where} recorded {recorded}"
                              " (the file was altered; restore it with `dvc pull data/checkpoints.dvc`)")


def _check(folder: Path, actual: Mapping[str, str], recorded: Mapping[str, str] | None,
           manifest: Mapping[str, Any], where: str) -> None:
    for name, want in (recorded or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, where)
    for name, want in (manifest.get("files") or {}).items():
        if name in actual and actual[name] != want:
            raise _mismatch(folder, name, actual[name], want, MANIFEST)


def _manifest_of(folder: Path, recorded: Mapping[str, str] | None, where: str) -> tuple[bytes, dict[str, Any]]:
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint: {MANIFEST} is missing")
    blob = (folder / MANIFEST).read_bytes()  # small; parsed from the very bytes hashed
    actual = hashlib.sha256(blob).hexdigest()
    if recorded and MANIFEST in recorded and recorded[MANIFEST] != actual:
        raise _mismatch(folder, MANIFEST, actual, recorded[MANIFEST], where)
    manifest = _parse_manifest(folder, blob)
    for name in tensor_files(manifest):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint: {name} is missing")
    return blob, manifest


def read_verified(folder: Path, recorded: Mapping[str, str] | None = None,
                  where: str = "the ledger") -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bytes of every file of one checkpoint folder and its parsed manifest, each checked
    against the manifest's ``files`` and against ``recorded`` (the ledger's, or the child's pointer).

    The bytes are read once and the caller parses these bytes, so what was checked is what
    is loaded. A checkpoint written before file hashes existed has no ``files``: it is
    checked against ``recorded`` only.
    """
    folder = Path(folder)
    blob, manifest = _manifest_of(folder, recorded, where)
    data = {name: (folder / name).read_bytes() for name in tensor_files(manifest)}
    data[MANIFEST] = blob
    _check(folder, {name: hashlib.sha256(b).hexdigest() for name, b in data.items()}, recorded, manifest, where)
    return data, manifest


def parent_of(folder: Path, manifest: Mapping[str, Any]) -> tuple[Path, dict[str, str], str] | None:
    """The parent version's folder (a sibling), the record its manifest must match and who
    recorded it, or None."""
    parent = manifest.get("parent")
    if not parent:
        return None
    return (Path(folder).parent / parent["version"], {MANIFEST: parent["manifest_sha256"]},
            f"{Path(folder).name}'s parent pointer")


def verify_checkpoint(folder: Path, recorded: Mapping[str, str] | None = None, chain: bool = True) -> dict[str, Any]:
    """Check every file of the checkpoint against both records and, with ``chain``, every link a
    load would read against its child's pointer (as :func:`read_verified`, but the tensor files
    are hashed in chunks, never held); returns the checkpoint's manifest. A caller that checks
    every version of a lineage against the ledger passes ``chain=False``."""
    folder, where = Path(folder), "the ledger"
    first = None
    while True:
        blob, manifest = _manifest_of(folder, recorded, where)
        actual = {**file_hashes(folder, tensor_files(manifest)), MANIFEST: hashlib.sha256(blob).hexdigest()}
        _check(folder, actual, recorded, manifest, where)
        first = first or manifest
        link = parent_of(folder, manifest)
        if not chain or snapshot_kind(manifest) or link is None:
            return first
        folder, recorded, where = link


def _parse_manifest(folder: Path, blob: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointTampered(f"checkpoint {folder.name}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointTampered(f"checkpoint {folder.name}: {MANIFEST} is not a JSON object")
    return manifest
