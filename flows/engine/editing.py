"""An edit session: the model being edited, its cumulative deltas D and editor state, one loop of sub-batches.

W = W_base + D is re-materialised after every edit, so D is the single truth a checkpoint
stores and a replay rebuilds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows.engine import precision
from flows.engine.checkpoints import read_checkpoint
from flows.engine.increments import Step
from nas_core.deltas import accumulate, edited_weights, frobenius_norms, materialise
from nas_core.editors import EDITORS, check_method
from nas_core.editors.base import Editor, EditResult
from nas_core.requests import EditRequest
from nas_core.spec import spec_for
from nas_core.state import EditState

log = logging.getLogger(__name__)


def make_editor(method: str, settings, cov: dict[int, torch.Tensor]) -> Editor:
    """The editor of a method or a baseline variant (``memit-plain`` runs MEMIT's class)."""
    return EDITORS[check_method(method)](settings, cov)


@dataclasses.dataclass(frozen=True)
class SessionSnapshot:
    """An :class:`EditSession` at one moment (tensors are never mutated in place, so no copies).

    ``spilled``: the file holding the state's maintained inverses (exact float64 bytes) when
    :meth:`EditSession.snapshot` was given one; the snapshot then does not hold them in memory."""

    cumulative: dict[str, torch.Tensor]
    state: EditState
    requests: int
    batches: int
    steps: int
    spilled: Path | None = None
    spilled_device: str = "cpu"

    def full_state(self) -> EditState:
        """The snapshot's state with its inverses (read back from ``spilled`` if they were spilled)."""
        if self.spilled is None:
            return self.state
        from safetensors.torch import load_file

        inverses = {int(k): v for k, v in load_file(self.spilled, device=self.spilled_device).items()}
        return dataclasses.replace(self.state, inverses=inverses)


@dataclasses.dataclass
class EditSession:
    """A model being edited: base weights kept for exact materialisation, D, state, log.

    ``increment`` holds the edit calls since ``parent`` (the version last loaded or written:
    its folder and manifest sha256; ``links``: the increments a load of it replays), which is what the
    next compact checkpoint stores; a study that never writes one sets ``keep_increment`` off.
    """

    model: nn.Module
    tok: Any
    model_name: str
    method: str
    settings: Any
    editor: Editor
    base_hash: str
    base: dict[str, torch.Tensor]
    cumulative: dict[str, torch.Tensor]
    state: EditState
    original_norms: dict[str, float]
    request_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    batch_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    increment: list[Step] = dataclasses.field(default_factory=list)
    parent: dict[str, str] | None = None
    links: int = 0
    keep_increment: bool = True

    def apply(self, requests: Sequence[EditRequest]) -> EditResult:
        """Edit one batch, then re-materialise W = W_base + D so D is the single truth."""
        t0 = time.perf_counter()
        result = self.editor.compute(self.model, self.tok, requests, self.state)
        self.cumulative = accumulate(self.cumulative, result.deltas)
        materialise(self.model, self.base, self.cumulative)
        self.state = result.state
        if self.keep_increment:
            self.increment.append(Step.of(result))
        seconds = time.perf_counter() - t0
        for r in result.requests:
            self.request_log.append(dataclasses.asdict(r))
        self.batch_log.append({"size": len(requests), "seconds": round(seconds, 3),
                               "timings": {k: round(v, 3) for k, v in result.timings.items()},
                               "layer_delta_norms": result.layer_delta_norms})
        return result

    def use_path(self, compute_dtype: str, attention: str, tail_group_slack: int) -> None:
        """Take a recorded v* path for the next edits (a replay of a night that took it)."""
        values = self.settings.values
        if (compute_dtype, attention, tail_group_slack) != (values.compute_dtype, values.attention,
                                                            values.tail_group_slack):
            self.settings = precision.with_path(self.settings, compute_dtype, attention, tail_group_slack)
            self.editor.settings = self.settings

    @property
    def compute_dtype(self) -> str:
        return self.settings.values.compute_dtype

    @property
    def attention(self) -> str:
        return self.settings.values.attention

    @property
    def tail_group_slack(self) -> int:
        return self.settings.values.tail_group_slack

    def snapshot(self, spill: Path | None = None) -> SessionSnapshot:
        """What :meth:`restore` needs to undo every later :meth:`apply` (a rejected batch).

        With ``spill``, the state's maintained inverses are written there instead of being held:
        once the next batch replaces them, the old ones would otherwise stay in memory through its
        evaluation (d_in^2 float64 per layer: 94 MB for SmolLM2's five, 8 GB for an 8B model's)."""
        state, spilled, device = self.state, None, "cpu"
        if spill is not None and state.inverses:
            from safetensors.torch import save_file

            device = str(next(iter(state.inverses.values())).device)
            save_file({str(k): v.contiguous() for k, v in state.inverses.items()}, str(spill))
            state, spilled = dataclasses.replace(state, inverses={}), Path(spill)
        return SessionSnapshot(self.cumulative, state, len(self.request_log), len(self.batch_log),
                               len(self.increment), spilled, device)

    def restore(self, snap: SessionSnapshot) -> None:
        """Back to ``snap``: D, state, logs and increment, and the weights re-materialised from D."""
        self.cumulative, self.state = snap.cumulative, snap.full_state()
        del self.request_log[snap.requests:], self.batch_log[snap.batches:], self.increment[snap.steps:]
        materialise(self.model, self.base, self.cumulative)

    def written(self, folder: Path, manifest_sha256: str, links: int) -> None:
        """``folder`` now holds this session's version: it is the parent of the next one."""
        self.parent = {"version": Path(folder).name, "manifest_sha256": manifest_sha256, "folder": str(folder)}
        self.links, self.increment = links, []

    def norms(self) -> dict[str, dict[str, float]]:
        now_norms = frobenius_norms(self.model, list(self.base))
        return {n: {"before": self.original_norms[n], "after": now_norms[n],
                    "ratio": now_norms[n] / self.original_norms[n]} for n in self.base}


def open_session(
    model: nn.Module,
    tok,
    model_name: str,
    method: str,
    settings,
    cov: dict[int, torch.Tensor],
    base_hash: str,
    reference_norm: float | None,
    checkpoint: Path | None = None,
    recorded_files: dict[str, str] | None = None,
) -> EditSession:
    """Start editing the base ``model``, or continue from ``checkpoint`` (its files checked
    against their manifest and, given, the ledger's ``recorded_files``). ``auto`` precision is
    resolved for the model's device here (:mod:`flows.engine.precision`)."""
    settings = precision.resolve(settings, next(model.parameters()).device)
    spec = spec_for(model)
    names = [spec.weight_name(layer) for layer in settings.layers]
    base = edited_weights(model, names)
    editor = make_editor(method, settings, cov)
    original = frobenius_norms(model, names)
    if checkpoint is None:
        state = dataclasses.replace(editor.init_state(model), reference_norm=reference_norm)
        return EditSession(model, tok, model_name, method, settings, editor, base_hash, base, {}, state,
                           original)
    ckpt = read_checkpoint(checkpoint, recorded_files)
    man = ckpt.manifest
    if man["base_weights_hash"] != base_hash:
        raise ValueError(f"checkpoint {checkpoint} was made from base weights "
                         f"{man['base_weights_hash'][:12]}, not the loaded model's {base_hash[:12]}")
    if man["method"] != method:
        raise ValueError(f"checkpoint {checkpoint} is a {man['method']} checkpoint, not {method}")
    materialise(model, base, ckpt.deltas)
    session = EditSession(model, tok, model_name, method, settings, editor, base_hash, base, ckpt.deltas,
                          ckpt.state(editor, model), original)
    session.request_log = list(man.get("requests", []))
    session.batch_log = list(man.get("batches", []))
    link = ckpt.chain[-1]
    session.written(link.folder, link.manifest_sha256, int(man.get("links", 0)))
    return session


def apply_in_batches(session: EditSession, requests: Sequence[EditRequest], batch_size: int,
                     logger: logging.Logger | logging.LoggerAdapter = log, label: str = "",
                     progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Apply ``requests`` as sequential edits of ``batch_size`` each: the one loop of the night,
    the replay and ``nas edit``. Each sub-batch is logged, or reported to ``progress(done, total)``
    instead. Returns the per-request diagnostics of this call."""
    start = len(session.request_log)
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        result = session.apply(requests[i : i + batch_size])
        done = min(i + batch_size, len(requests))
        if progress is not None:
            progress(done, len(requests))
            continue
        logger.info("%sedited %d/%d requests (%.1f s/edit); ||delta W|| per layer: %s", f"{label}: " if label else "",
                    done, len(requests), (time.perf_counter() - t0) / done,
                    ", ".join(f"{k}: {v:.3g}" for k, v in result.layer_delta_norms.items()))
    return session.request_log[start:]
