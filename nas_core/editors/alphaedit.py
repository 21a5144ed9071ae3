"""AlphaEdit (arXiv 2410.02355): every update lies in the null space of preserved keys."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from nas_core.editors.base import (
    EditResult,
    Stopwatch,
    all_skipped,
    inverse_or,
    kept_targets,
    require_cov,
    spread_over_layers,
)
from nas_core.linalg import nullspace_projector, woodbury_solve
from nas_core.requests import EditRequest
from nas_core.settings import AlphaEditSettings
from nas_core.spec import spec_for
from nas_core.state import EditState

log = logging.getLogger(__name__)


class AlphaEditEditor:
    """X = (P (K K^T + S) + beta I)^-1 P K R^T, Delta_l = X^T, for each edited layer l.

    The inverse of P S + beta I is carried in the state and updated by Woodbury, which
    equals :func:`nas_core.linalg.projected_solve` (tested) at a fraction of the cost.

    Args:
        settings: the AlphaEdit settings (NAS included).
        cov: layer -> (d_in, d_in) second moment C; P is built from it once, in
            :meth:`init_state`, and then travels in the state. The editor lets go of C then (no
            solve reads it: 19 MB of float64 per SmolLM2 layer, 1.6 GB per 8B layer) and hands
            the same P to any later :meth:`init_state`.
    """

    name = "alphaedit"

    def __init__(self, settings: AlphaEditSettings, cov: dict[int, torch.Tensor]):
        require_cov(settings.layers, cov)
        self.settings = settings
        self.cov: dict[int, torch.Tensor] | None = {layer: cov[layer] for layer in settings.layers}
        self._projectors: dict[int, torch.Tensor] | None = None

    def init_state(self, model: nn.Module) -> EditState:
        if self._projectors is None:
            self._projectors = self._build_projectors()
            self.cov = None
        return EditState(layers=self.settings.layers, projectors=dict(self._projectors))

    def _build_projectors(self) -> dict[int, torch.Tensor]:
        s = self.settings
        projectors = {
            layer: nullspace_projector(self.cov[layer], s.nullspace_threshold, s.nullspace_relative_threshold).float()
            for layer in s.layers
        }
        # The null space's dimension is the number of free directions: 0 means no edit can land.
        dims = {layer: round(float(torch.trace(p))) for layer, p in projectors.items()}
        log.info("AlphaEdit null-space dimension per layer: %s", dims)
        if any(d == 0 for d in dims.values()):
            log.warning("AlphaEdit: layers %s have an empty null space (every eigenvalue of C is above the cut): "
                        "their updates will be zero; use nullspace_relative_threshold", [k for k, d in dims.items()
                                                                                          if d == 0])
        return projectors

    def compute(
        self, model: nn.Module, tok, requests: Sequence[EditRequest], state: EditState
    ) -> EditResult:
        s, spec, clock = self.settings, spec_for(model), Stopwatch()
        if any(layer not in state.projectors for layer in s.layers):
            raise ValueError("AlphaEdit state has no projector; build it with init_state()")
        tg, kept = kept_targets(model, tok, spec, requests, s.layers[-1], s, state, clock)
        if not kept:
            return all_skipped(requests, state, tg, clock)

        inverses: dict[int, torch.Tensor] = {}

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # X = A^-1 (P K) R^T is taken as (A^-1 P K) R^T: O(d_in^2 n) instead of O(d_in^2 d_out).
            a_inv_pk, inverses[layer] = self._system(state, layer, keys)  # (d_in, n)
            return resid, a_inv_pk  # Delta = R (A^-1 P K)^T

        return spread_over_layers(model, tok, spec, requests, kept, tg, s, solve, clock, state, inverses)

    def replay(self, state: EditState, keys: dict[int, torch.Tensor], edited: int, skipped: int) -> EditState:
        inverses = {layer: self._system(state, layer, k)[1] for layer, k in keys.items()}
        return state.advanced(edited, skipped, inverses)

    def _system(self, state: EditState, layer: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A^-1 P K for A = P S + beta I + (P K) K^T, and the new maintained inverse, through the
        state's (P S + beta I)^-1 (beta^-1 I on the first batch)."""
        p = state.projectors[layer].double()
        d = p.shape[0]
        inv = inverse_or(state, layer, lambda: torch.eye(d, dtype=torch.float64, device=p.device) / self.settings.l2)
        pk = p @ keys.double()  # (d_in, n)
        return woodbury_solve(inv, pk, keys, pk)
