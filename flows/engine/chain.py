"""Rebuild a version from its chain: the nearest snapshot (or the base) and the increments after it.

D is rebuilt with :meth:`nas_core.deltas.LowRankUpdate.dense` and the editor state with
:meth:`nas_core.editors.base.Editor.replay`, the very code that wrote them, so a rebuilt
version has the weights hash its manifest recorded (checked by every load) and editing
continues bit for bit as it would have in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from torch import nn

from flows.engine.checkpoint_format import DELTAS, MANIFEST, STATE, parent_of, read_verified, snapshot_kind
from flows.engine.increments import INCREMENT, Step, unpack
from nas_core.deltas import accumulate
from nas_core.editors.base import Editor
from nas_core.state import EditState


@dataclass(frozen=True)
class Link:
    """One checkpoint folder of a chain, its files read and verified."""

    folder: Path
    manifest: dict[str, Any]
    data: dict[str, bytes]

    @property
    def snapshot(self) -> str | None:
        return snapshot_kind(self.manifest)

    def steps(self) -> list[Step]:
        """The edit calls since the parent (none for a format-1 checkpoint)."""
        if INCREMENT not in self.data:
            return []
        return unpack(load_tensors(self.data[INCREMENT]), self.manifest.get("increment", []))

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.data[MANIFEST]).hexdigest()

    def deltas(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.data[DELTAS])

    def state(self) -> EditState:
        return EditState.from_state_dict(load_tensors(self.data[STATE]))


def links_back(folder: Path, recorded: Mapping[str, str] | None = None) -> Iterator[Link]:
    """``folder``'s version, then its parent, grandparent... to a version without a parent, each
    read and verified: the version against ``recorded``, each parent's manifest against its child's
    pointer. A parent folder that is missing is a FileNotFoundError naming it."""
    folder, where = Path(folder), "the ledger"
    while True:
        data, manifest = read_verified(folder, recorded, where)
        yield Link(folder, manifest, data)
        parent = parent_of(folder, manifest)
        if parent is None:
            return
        if not (parent[0] / MANIFEST).is_file():
            raise FileNotFoundError(f"checkpoint {folder.name} needs its parent {parent[0].name}, which is "
                                    f"missing from {folder.parent} (restore it with `dvc pull data/checkpoints.dvc`)")
        folder, recorded, where = parent


def read_chain(folder: Path, recorded: Mapping[str, str] | None = None) -> list[Link]:
    """The links a load of ``folder`` reads, oldest first: back to the nearest snapshot or to a
    version without a parent (:func:`links_back`)."""
    links = []
    for link in links_back(folder, recorded):
        links.append(link)
        if link.snapshot:
            break
    return links[::-1]


def applied_steps(chain: list[Link]) -> Iterator[Step]:
    """The steps to apply on top of the chain's start, in order (an ``end`` snapshot's own
    increment is already in its D and state)."""
    for i, link in enumerate(chain):
        if i == 0 and link.snapshot == "end":
            continue
        yield from link.steps()


def rebuild_deltas(chain: list[Link]) -> dict[str, torch.Tensor]:
    """The cumulative float32 deltas D of the chain's last version."""
    start = chain[0]
    cumulative = start.deltas() if start.snapshot else {}
    for step in applied_steps(chain):
        cumulative = accumulate(cumulative, step.updates())
    return cumulative


def rebuild_state(chain: list[Link], editor: Editor, model: nn.Module) -> EditState:
    """The editor state of the chain's last version; the AlphaEdit projector comes from the
    editor's covariance (``init_state``) when the snapshot does not carry it."""
    start = chain[0]
    if start.snapshot:
        state = start.state()
        if not state.projectors:
            state = dataclasses.replace(state, projectors=editor.init_state(model).projectors)
    else:
        state = dataclasses.replace(editor.init_state(model), reference_norm=start.manifest["reference_norm"])
    for step in applied_steps(chain):
        state = editor.replay(state, step.keys, step.edited, step.skipped)
    return state


def lineage_steps(folder: Path) -> list[Step] | None:
    """Every edit call from the base to ``folder``'s version (verified), or None when a version
    of the lineage lacks part of its increment (format 1, a study's snapshot, a standalone copy
    that starts from a snapshot): its factors are lost."""
    steps: list[Step] = []
    for link in links_back(folder):
        if link.snapshot == "start" or INCREMENT not in link.data or link.manifest.get("increment_complete") is False:
            return None
        steps[:0] = link.steps()
    return steps


__all__ = ["Link", "applied_steps", "lineage_steps", "links_back", "read_chain", "rebuild_deltas", "rebuild_state"]
