"""Checkpoints: a version's folder (deltas, editor state, manifest), written atomically and
checked against its recorded sha256s on every read.

``write_checkpoint`` records the sha256 of ``deltas.safetensors`` and ``state.safetensors`` in
the manifest (``files``); the night's ``promote`` ledger line records all three, the
manifest's included. Loading, rollback, promote, ``nas status --verify`` and ``nas audit``
call :func:`verify_checkpoint`, which refuses a checkpoint whose bytes differ from either
record with a one-line :class:`CheckpointTampered` naming the file and both hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn

from flows.io import now, sha256_file
from nas_core.deltas import edited_weights, materialise, weights_hash
from nas_core.state import EditState

if TYPE_CHECKING:
    from flows.engine.editing import EditSession

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


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the fully written folder ``tmp`` at ``out`` (two renames; an old ``out`` is removed last),
    so a reader never sees a half-written folder."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_checkpoint(session: EditSession, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write deltas.safetensors, state.safetensors and manifest.json into ``out`` atomically.

    The folder is assembled under a temp name and renamed, so a crash leaves either the
    old checkpoint or the new one, never half of one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in session.cumulative.items()}, tmp / "deltas.safetensors")
        save_file(session.state.state_dict(), tmp / "state.safetensors")
        manifest = {
            "files": file_hashes(tmp, TENSOR_FILES),
            "format": "nas-checkpoint/1",
            "model": session.model_name,
            "base_weights_hash": session.base_hash,
            "weights_hash": weights_hash(session.model),
            "method": session.method,
            "settings": dataclasses.asdict(session.settings),
            "edited_weights": sorted(session.base),
            "edit_count": session.state.edit_count,
            "skipped_count": session.state.skipped_count,
            "reference_norm": session.state.reference_norm,
            "request_ids": [r["case_id"] for r in session.request_log if not r["skipped"]],
            "norms": session.norms(),
            "requests": session.request_log,
            "batches": session.batch_log,
            "created": now(),
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint(path: Path, recorded_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Load a checkpoint folder (safetensors only, never pickle), every file checked against
    its recorded sha256 first (:func:`flows.engine.checkpoints.read_verified`)."""
    data, manifest = read_verified(Path(path), recorded_files)
    return {
        "deltas": load_tensors(data["deltas.safetensors"]),
        "state": EditState.from_state_dict(load_tensors(data["state.safetensors"])),
        "manifest": manifest,
    }


def load_checkpoint_into(model: nn.Module, base_hash: str, path: Path,
                         recorded_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Set the unedited ``model``'s edited weights to base + the checkpoint's deltas; returns its manifest.

    Refuses a checkpoint made from other base weights (compared by ``weights_hash``) and one
    whose files do not hash to what was recorded.
    """
    ckpt = read_checkpoint(path, recorded_files)
    man = ckpt["manifest"]
    if man["base_weights_hash"] != base_hash:
        raise ValueError(f"checkpoint {path} was made from base weights {man['base_weights_hash'][:12]}, "
                         f"not the loaded model's {base_hash[:12]}")
    materialise(model, edited_weights(model, list(ckpt["deltas"])), ckpt["deltas"])
    return man


def rebuild_verified(model: nn.Module, base_hash: str, path: Path) -> str:
    """:func:`load_checkpoint_into`, then the rebuilt weights' hash checked against the manifest's;
    returns that hash. A mismatch is a ValueError, like every other refusal of the checkpoint."""
    manifest = load_checkpoint_into(model, base_hash, path)
    got = weights_hash(model)
    if got != manifest["weights_hash"]:
        raise ValueError(f"rebuilt weights hash {got[:12]} != checkpoint's {manifest['weights_hash'][:12]}")
    return got


__all__ = ["FILES", "MANIFEST", "TENSOR_FILES", "CheckpointTampered", "file_hashes", "load_checkpoint_into",
           "read_checkpoint", "read_verified", "rebuild_verified", "replace_dir", "verify_checkpoint",
           "write_checkpoint"]
