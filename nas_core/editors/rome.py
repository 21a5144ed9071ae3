"""r-ROME (arXiv 2403.07175): a rank-one update of one layer with one consistent key."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nas_core.deltas import LowRankUpdate
from nas_core.editors.base import (
    EditResult,
    Stopwatch,
    all_skipped,
    diagnostics,
    kept_targets,
    require_cov,
    sweep_layers,
)
from nas_core.keys import read_at_subject
from nas_core.linalg import classic_rank_one_factors, rank_one_factors
from nas_core.requests import EditRequest
from nas_core.settings import RomeSettings
from nas_core.spec import spec_for
from nas_core.state import EditState


class RomeEditor:
    """Delta = r (C^-1 k)^T / (k^T C^-1 k), k the prefix-averaged key used everywhere.

    ROME is one fact at a time: the values of a batch are optimised together against the
    model at the start of the batch, then each request's rank-one update is written in
    turn, its residual re-read after the previous ones.
    """

    name = "rome"

    def __init__(self, settings: RomeSettings, cov: dict[int, torch.Tensor]):
        require_cov(settings.layers[:1], cov)
        self.settings = settings
        self.cov = cov

    def init_state(self, model: nn.Module) -> EditState:
        return EditState(layers=self.settings.layers)

    def compute(
        self, model: nn.Module, tok, requests: Sequence[EditRequest], state: EditState
    ) -> EditResult:
        s, spec, clock = self.settings, spec_for(model), Stopwatch()
        layer = s.layers[0]
        tg, kept = kept_targets(model, tok, spec, requests, layer, s, state, clock)
        if not kept:
            return all_skipped(requests, state, tg, clock)
        total: torch.Tensor | None = None
        all_keys, pairs = [], []

        def solve(_layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # rank_one_factors raises if k^T C^-1 k is not positive (the collapse "The Fall of ROME" describes).
            left, right, _denominator = rank_one_factors(keys[:, 0], resid[:, 0], self.cov[layer], s.cov_jitter)
            return left, right

        for i, req in enumerate(kept):
            step = solve if s.prefix_consistent else self._classic_solve(model, tok, spec, req, tg.z[i])
            deltas, factors, keys, _ = sweep_layers(model, tok, spec, [req], tg.z[i : i + 1], [layer],
                                                    s.values.prefixes, step, clock)
            all_keys.append(keys[layer])
            (name, d), = deltas.items()
            pairs.extend(factors[name].pairs)
            total = d if total is None else total + d
        added = {layer: torch.cat(all_keys, dim=1)}
        new_state = self.replay(state, added, len(kept), len(requests) - len(kept))
        return EditResult({name: total}, new_state, diagnostics(requests, tg), {layer: float(total.norm())},
                          clock.times, {name: LowRankUpdate(tuple(pairs), spec.transposed)}, added)

    def replay(self, state: EditState, keys: dict[int, torch.Tensor], edited: int, skipped: int) -> EditState:
        return state.advanced(edited, skipped)

    def _classic_solve(self, model: nn.Module, tok, spec, req: EditRequest, z: torch.Tensor):
        """The solve of classic ROME for ``req``: the bare prompt's key and residual read at
        call time (after the earlier requests of the batch were written), k* from the sweep."""
        s, layer = self.settings, self.settings.layers[0]

        def solve(_layer: int, keys: torch.Tensor, _resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bare = read_at_subject(model, tok, spec, [req], [layer], ("",), readout_layer=layer)
            bare_key = bare.keys[layer][0]  # (d_in,)
            bare_resid = z - bare.hidden[0]  # (d_model,)
            left, right, _denominator = classic_rank_one_factors(keys[:, 0], bare_key, bare_resid, self.cov[layer],
                                                                 s.cov_jitter)
            return left, right

        return solve
