"""Norm-Anchor Scaling (NAS, arXiv 2602.02543).

Sequential editing collapses because bigger edited weights demand bigger value vectors,
which make the weights bigger still. NAS breaks that loop: every solved v* is rescaled to
one reference norm a, measured once on the *unedited* model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nas_core.requests import EditRequest
from nas_core.settings import NASSettings, ValueSettings
from nas_core.spec import ModelSpec
from nas_core.values import optimise_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorResult:
    """v* after NAS for n requests.

    Attributes:
        v_star: (n, d) anchored values (rows of skipped requests are left unchanged).
        norms_before: (n,) ||v*|| as optimised.
        norms_after: (n,) ||v*|| after anchoring.
        outlier: (n,) bool, ||v*|| > outlier_factor * a.
        skipped: (n,) bool, outliers dropped by the "skip" policy.
    """

    v_star: torch.Tensor
    norms_before: torch.Tensor
    norms_after: torch.Tensor
    outlier: torch.Tensor
    skipped: torch.Tensor


def anchor(v_star: torch.Tensor, reference_norm: float, settings: NASSettings) -> AnchorResult:
    """Rescale each row of ``v_star`` (n, d) to ``reference_norm``, both up and down.

    Outliers (norm above ``outlier_factor * reference_norm``) are skipped or kept by
    ``settings.outlier_policy``; kept outliers are rescaled like every other row, which
    is the clip.
    """
    if reference_norm <= 0:
        raise ValueError(f"reference norm must be > 0, got {reference_norm}")
    norms = v_star.norm(dim=1)  # (n,)
    outlier = norms > settings.outlier_factor * reference_norm
    skipped = outlier if settings.outlier_policy == "skip" else torch.zeros_like(outlier)
    scaled = v_star * (reference_norm / norms.clamp_min(1e-12))[:, None]
    out = torch.where(skipped[:, None], v_star, scaled)
    return AnchorResult(
        v_star=out,
        norms_before=norms,
        norms_after=out.norm(dim=1),
        outlier=outlier,
        skipped=skipped,
    )


@dataclass(frozen=True)
class Calibration:
    """The reference norm a and how it was obtained."""

    reference_norm: float
    pilots: int
    dropped: int
    norms: tuple[float, ...]


def reference_norm_from(norms: torch.Tensor, drop_top_fraction: float) -> Calibration:
    """Mean of ``norms`` (N,) after dropping the top ``drop_top_fraction`` of them."""
    if norms.numel() == 0:
        raise ValueError("no pilot norms to calibrate from")
    ordered = norms.double().sort().values
    dropped = int(round(drop_top_fraction * ordered.numel()))
    kept = ordered[: ordered.numel() - dropped] if dropped < ordered.numel() else ordered[:1]
    return Calibration(
        reference_norm=float(kept.mean()),
        pilots=int(norms.numel()),
        dropped=dropped,
        norms=tuple(float(x) for x in norms),
    )


def pilot_batches(pilots: Sequence[EditRequest], batch_size: int) -> list[Sequence[EditRequest]]:
    """``pilots`` cut into consecutive batches of ``batch_size`` (the last one shorter): the unit
    of calibration. A batch's v* depend only on the batch and the torch threads, so any runner
    that optimises these batches gives the same norms."""
    return [pilots[start : start + batch_size] for start in range(0, len(pilots), batch_size)]


def batch_norms(model: nn.Module, tok, spec: ModelSpec, batch: Sequence[EditRequest], layer: int,
                values: ValueSettings) -> torch.Tensor:
    """(len(batch),) ||v*|| of one pilot batch, optimised together on ``model`` (NAS off)."""
    return optimise_values(model, tok, spec, batch, layer, values).v_star.norm(dim=1)


def pilot_norms_here(model: nn.Module, tok, spec: ModelSpec, pilots: Sequence[EditRequest], layer: int,
                     values: ValueSettings, batch_size: int,
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(len(pilots),) ||v*|| of the pilots, their batches optimised one after another on ``model``;
    ``progress(done, total)`` is called after each batch."""
    norms: list[torch.Tensor] = []
    done = 0
    for batch in pilot_batches(pilots, batch_size):
        norms.append(batch_norms(model, tok, spec, batch, layer, values))
        done += len(batch)
        if progress is not None:
            progress(done, len(pilots))
    return torch.cat(norms)


def calibrate(
    model: nn.Module,
    tok,
    spec: ModelSpec,
    pilots: Sequence[EditRequest],
    layer: int,
    values: ValueSettings,
    nas: NASSettings,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Reference norm a from pilot requests on the unedited model (NAS off while solving).

    Pilots are optimised ``nas.pilot_batch_size`` at a time. ``progress(done, total)`` is
    called after each batch.
    """
    norms = pilot_norms_here(model, tok, spec, pilots, layer, values, nas.pilot_batch_size, progress)
    cal = reference_norm_from(norms, nas.drop_top_fraction)
    log.info("NAS reference norm %.3f from %d pilots (%d dropped)", cal.reference_norm, cal.pilots,
             cal.dropped)
    return cal


def targets(
    hidden: torch.Tensor,
    v0: torch.Tensor,
    delta: torch.Tensor,
    reference_norm: float | None,
    settings: NASSettings,
) -> tuple[torch.Tensor, AnchorResult | None]:
    """Residual-stream targets Z (n, d) for the editors.

    NAS on: z_i = (h_i - v0_i) + a * v*_i / ||v*_i||, with v*_i = v0_i + delta_i.
    NAS off: z_i = h_i + delta_i.
    """
    if not settings.enabled:
        return hidden + delta, None
    if reference_norm is None:
        raise ValueError("NAS is enabled but no reference norm was calibrated")
    result = anchor(v0 + delta, reference_norm, settings)
    return hidden - v0 + result.v_star, result
