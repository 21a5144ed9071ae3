"""Checkpoints: a version's folder, written atomically and checked against its recorded sha256s
on every read.

Format ``nas-checkpoint/2`` (compact): ``increment.safetensors`` holds the factor pairs and keys
of every edit call since the parent version (:mod:`flows.engine.increments`), the manifest
points at the parent (``parent``: its folder name, a sibling, and its manifest's sha256). The
cumulative deltas D and the editor state are rebuilt from the chain (:mod:`flows.engine.chain`).
A *snapshot* also holds ``deltas.safetensors`` and ``state.safetensors`` (the state without the
AlphaEdit projector, which is rebuilt from the covariance): ``"snapshot": "end"`` after its
increment (written when a load would otherwise replay ``checkpoints.snapshot_every``
increments), ``"start"`` before it (a standalone copy). Format ``nas-checkpoint/1``
(D and the full state, no increment) is read as an ``end`` snapshot.

The manifest's ``files`` records every other file's sha256; the night's ``promote`` ledger line
records all of them, the manifest's included. Loading, rollback, promote, ``nas status
--verify`` and ``nas audit`` verify them (and the chain's pointers) and refuse a checkpoint
whose bytes differ from a record with a one-line :class:`CheckpointTampered` naming the file
and both hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from flows.engine.chain import Link, applied_steps, read_chain, rebuild_deltas, rebuild_state
from flows.engine.checkpoint_format import (
    DELTAS,
    FORMAT,
    MANIFEST,
    SNAPSHOT_FILES,
    STATE,
    CheckpointTampered,
    file_hashes,
    read_verified,
    tensor_files,
    verify_checkpoint,
)
from flows.engine.increments import INCREMENT, pack
from flows.io import now
from nas_core.deltas import edited_weights, materialise, weights_hash
from nas_core.editors.base import Editor
from nas_core.state import EditState

if TYPE_CHECKING:
    from flows.engine.editing import EditSession

#: A load replays fewer increments than this (the checkpoints.snapshot_every default).
SNAPSHOT_EVERY = 30


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp folder beside ``out`` to fill; put at ``out`` (:func:`replace_dir`) when the block
    ends, removed when it raises, so a crash leaves the old ``out`` or the new one, never half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_checkpoint(session: EditSession, out: Path, extra: dict[str, Any] | None = None,
                     snapshot_every: int = SNAPSHOT_EVERY) -> Path:
    """Write the session's version into ``out`` atomically and make it the session's parent.

    Compact (the increment since the parent) when the parent is a sibling folder and a load
    replays fewer than ``snapshot_every`` increments; otherwise a snapshot. The
    folder is assembled under a temp name and renamed, so a crash leaves either the old
    checkpoint or the new one, never half of one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parent, links, snapshot = _link_to_parent(session, out)
    if links >= snapshot_every or not session.keep_increment:
        snapshot = "end"
    complete = session.keep_increment and (session.parent is None or parent is not None)
    with staged_dir(out) as tmp:
        tensors, increment = pack(session.increment)
        save_file(tensors, tmp / INCREMENT)
        if snapshot:
            save_file({k: v.contiguous() for k, v in session.cumulative.items()}, tmp / DELTAS)
            save_file(session.state.state_dict(projectors=False), tmp / STATE)
        manifest = {
            "files": file_hashes(tmp, (INCREMENT, *(SNAPSHOT_FILES if snapshot else ()))),
            "format": FORMAT,
            "parent": {k: parent[k] for k in ("version", "manifest_sha256")} if parent else None,
            "snapshot": snapshot,
            "links": 0 if snapshot else links,
            "increment": increment,
            # False when an edit since the parent (or the base) is not in the increment: a study's
            # session that keeps none, or a parent that is not a sibling. Export then needs D's SVD.
            "increment_complete": complete,
            **_description(session),
            **(extra or {}),
        }
        blob = json.dumps(manifest, indent=1).encode("utf-8")
        (tmp / MANIFEST).write_bytes(blob)
    session.written(out, hashlib.sha256(blob).hexdigest(), manifest["links"])
    return out


def _link_to_parent(session: EditSession, out: Path) -> tuple[dict[str, str] | None, int, str | None]:
    """``(parent pointer, increments a load replays, snapshot kind)`` for writing ``out``: a root
    (no parent: the session started from the base), the child of a sibling folder, or, when the
    parent is elsewhere (or is ``out`` itself, rewritten), a snapshot that stands alone."""
    parent = session.parent
    if parent is None:
        return None, 1, None
    folder = Path(parent["folder"])
    if folder.parent.resolve() == out.parent.resolve() and folder.resolve() != out.resolve():
        return parent, session.links + 1, None
    return None, 0, "end"


def _description(session: EditSession) -> dict[str, Any]:
    """What every manifest says about the session (model, method, counts, norms, logs)."""
    return {
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
    }


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its manifest, D, and the chain that rebuilt them."""

    manifest: dict[str, Any]
    deltas: dict[str, torch.Tensor]
    chain: list[Link]

    def state(self, editor: Editor, model: nn.Module) -> EditState:
        """The editor state to continue editing from (:func:`flows.engine.chain.rebuild_state`)."""
        return rebuild_state(self.chain, editor, model)


def read_checkpoint(path: Path, recorded_files: dict[str, str] | None = None) -> Checkpoint:
    """Load a checkpoint (safetensors only, never pickle), every file of its chain checked
    against its recorded sha256 first (:func:`flows.engine.chain.read_chain`)."""
    chain = read_chain(Path(path), recorded_files)
    return Checkpoint(chain[-1].manifest, rebuild_deltas(chain), chain)


def load_checkpoint_into(model: nn.Module, base_hash: str, path: Path,
                         recorded_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Set the unedited ``model``'s edited weights to base + the checkpoint's deltas; returns its manifest.

    Refuses a checkpoint made from other base weights (compared by ``weights_hash``) and one
    whose files do not hash to what was recorded.
    """
    ckpt = read_checkpoint(path, recorded_files)
    man = ckpt.manifest
    if man["base_weights_hash"] != base_hash:
        raise ValueError(f"checkpoint {path} was made from base weights {man['base_weights_hash'][:12]}, "
                         f"not the loaded model's {base_hash[:12]}")
    materialise(model, edited_weights(model, list(ckpt.deltas)), ckpt.deltas)
    return man


def rebuild_verified(model: nn.Module, base_hash: str, path: Path) -> str:
    """:func:`load_checkpoint_into`, then the rebuilt weights' hash checked against the manifest's;
    returns that hash. A mismatch is a ValueError, like every other refusal of the checkpoint."""
    manifest = load_checkpoint_into(model, base_hash, path)
    got = weights_hash(model)
    if got != manifest["weights_hash"]:
        raise ValueError(f"rebuilt weights hash {got[:12]} != checkpoint's {manifest['weights_hash'][:12]}")
    return got


def registry_files(folder: Path) -> tuple[str, ...]:
    """The files of a checkpoint that MLflow's registry holds: every one but the editor state."""
    manifest = verify_checkpoint(folder)
    return tuple(name for name in (*tensor_files(manifest), MANIFEST) if name != STATE)


def standalone_copy(src: Path, dst: Path, recorded: Mapping[str, str] | None = None) -> Path:
    """Replace ``dst`` with a checkpoint of ``src``'s version that needs no other folder: the
    chain's start snapshot (if any) and every increment after it, in one folder (written aside,
    then renamed). Its weights hash is ``src``'s; only the manifest's bookkeeping differs."""
    chain = read_chain(Path(src), recorded)
    with staged_dir(dst) as tmp:
        start, target = chain[0], chain[-1].manifest
        kind = {"end": "start" if len(chain) > 1 else "end", "start": "start", None: None}[start.snapshot]
        steps = list(start.steps()) if kind == "end" else list(applied_steps(chain))
        tensors, increment = pack(steps)
        save_file(tensors, tmp / INCREMENT)
        for name in SNAPSHOT_FILES if kind else ():
            (tmp / name).write_bytes(start.data[name])
        complete = kind is None and all(link.manifest.get("increment_complete", True) for link in chain)
        manifest = {**target, "format": FORMAT, "parent": None, "snapshot": kind, "links": 0 if kind == "end" else 1,
                    "increment": increment, "increment_complete": complete, "copied_from": Path(src).name,
                    "files": file_hashes(tmp, (INCREMENT, *(SNAPSHOT_FILES if kind else ())))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return dst


__all__ = ["MANIFEST", "SNAPSHOT_EVERY", "Checkpoint", "CheckpointTampered", "file_hashes", "load_checkpoint_into",
           "read_checkpoint", "read_verified", "rebuild_verified", "registry_files", "replace_dir", "staged_dir",
           "standalone_copy", "verify_checkpoint", "write_checkpoint"]
