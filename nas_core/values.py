"""Target values v*: the residual shift that makes the model say the new target.

MEMIT's ``compute_z``, batched: every request of a batch shares each forward/backward,
keeps its own shift delta_i, its own clamp and its own early stop. Because requests
live in separate rows and the loss is a *sum* over requests, each delta_i gets exactly
the gradient it would get alone; Adam is element-wise, so batching changes speed, not
the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.hooks import add_at_positions, capture, replay_layers
from nas_core.prompts import TokenisedPrompt, pad_batch, pad_token_id, target_ids, tokenise
from nas_core.requests import EditRequest
from nas_core.settings import ValueSettings
from nas_core.spec import ModelSpec, get_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueResult:
    """Outcome of the v* optimisation for n requests at one layer.

    Attributes:
        delta: (n, d_model) optimised residual shift after the layer.
        v0: (n, d_model) the MLP's contribution there on the bare prompt (before the shift).
        hidden: (n, d_model) the residual stream there on the bare prompt (h).
        nll_start: (n,) mean target NLL before optimising.
        nll_end: (n,) mean target NLL at the last evaluated step.
        steps: (n,) optimisation steps each request took.
    """

    delta: torch.Tensor
    v0: torch.Tensor
    hidden: torch.Tensor
    nll_start: torch.Tensor
    nll_end: torch.Tensor
    steps: torch.Tensor

    @property
    def v_star(self) -> torch.Tensor:
        """(n, d_model) v* = v0 + delta, the value whose norm NAS anchors."""
        return self.v0 + self.delta


@dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    subject_rows: torch.Tensor  # (B,) request index of each row
    subject_pos: torch.Tensor  # (B,) subject's last token in each row
    tgt_rows: torch.Tensor  # (P,) row of each predicted target token
    tgt_pos: torch.Tensor  # (P,) position whose logits predict it
    tgt_ids: torch.Tensor  # (P,) the target token
    tgt_owner: torch.Tensor  # (P,) request index
    tgt_weight: torch.Tensor  # (P,) 1 / (tokens in its row * rows of its request)
    kl_rows: torch.Tensor  # (n,) row of each request's KL prompt
    bare_rows: torch.Tensor  # (n,) row of each request's bare prompt


def _build_batch(tok, requests: Sequence[EditRequest], settings: ValueSettings, device) -> _Batch:
    rows: list[TokenisedPrompt] = []
    owners: list[int] = []
    bare_rows: list[int] = []
    tr, tp, ti, to, tw = [], [], [], [], []
    n_ctx = len(settings.prefixes)
    for i, req in enumerate(requests):
        tgt = target_ids(tok, req.target_new)
        for j, prefix in enumerate(settings.prefixes):
            if j == 0:
                bare_rows.append(len(rows))
            p = tokenise(tok, prefix, req.prompt, req.subject, tgt)
            for k, t in enumerate(tgt):
                tr.append(len(rows))
                tp.append(p.target_start - 1 + k)
                ti.append(t)
                to.append(i)
                tw.append(1.0 / (len(tgt) * n_ctx))
            rows.append(p)
            owners.append(i)
    kl_rows = []
    for i, req in enumerate(requests):
        kl_rows.append(len(rows))
        rows.append(tokenise(tok, "", settings.kl_prompt, req.subject))
        owners.append(i)
    ids, mask = pad_batch(rows, pad_token_id(tok), device)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return _Batch(
        ids=ids,
        mask=mask,
        subject_rows=t(owners),
        subject_pos=t([r.subject_pos for r in rows]),
        tgt_rows=t(tr),
        tgt_pos=t(tp),
        tgt_ids=t(ti),
        tgt_owner=t(to),
        tgt_weight=t(tw, torch.float32),
        kl_rows=t(kl_rows),
        bare_rows=t(bare_rows),
    )


def logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and Gemma's logit soft-cap) to selected final hidden states."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _decoder_layers(model: nn.Module, spec: ModelSpec, upto: int) -> list[nn.Module]:
    return [get_module(model, spec.layer_name(i)) for i in range(upto + 1)]


def optimise_values(
    model: nn.Module,
    tok,
    spec: ModelSpec,
    requests: Sequence[EditRequest],
    layer: int,
    settings: ValueSettings,
) -> ValueResult:
    """Optimise one residual shift per request after block ``layer`` (batched).

    Loss per request: mean NLL of ``target_new`` over the bare and prefixed prompts
    + ``kl_factor`` * KL on ``kl_prompt`` + ``weight_decay`` * ||delta|| / ||h||^2.
    """
    device = next(model.parameters()).device
    b = _build_batch(tok, requests, settings, device)
    n = len(requests)
    layer_mod = get_module(model, spec.layer_name(layer))
    mlp_mod = get_module(model, spec.mlp_name(layer))
    base = model.base_model
    all_rows = torch.arange(b.ids.shape[0], device=device)

    # One clean pass: h, v0 at the bare prompt, the KL reference, and the outputs of the
    # blocks up to ``layer``, which the shift cannot change and are replayed below.
    lower = _decoder_layers(model, spec, layer)
    with torch.no_grad(), ExitStack() as stack:
        cap_h = stack.enter_context(capture(layer_mod))
        cap_v = stack.enter_context(capture(mlp_mod))
        lower_caps = [stack.enter_context(capture(m, outputs=False, raw=True)) for m in lower]
        final = base(input_ids=b.ids, attention_mask=b.mask, use_cache=False).last_hidden_state
        hidden = cap_h.outputs[0][b.bare_rows, b.subject_pos[b.bare_rows]].float()  # (n, d)
        v0 = cap_v.outputs[0][b.bare_rows, b.subject_pos[b.bare_rows]].float()  # (n, d)
        kl_ref = F.log_softmax(logits_at(model, final[b.kl_rows, b.subject_pos[b.kl_rows]]), -1)
    cached_outputs = [c.raw_outputs[0] for c in lower_caps]

    delta = torch.zeros((n, hidden.shape[1]), dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    h_norm = hidden.norm(dim=1)  # (n,)
    max_norm = settings.clamp_norm_factor * h_norm
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    nll_start = torch.zeros(n, device=device)
    nll_last = torch.zeros(n, device=device)

    with replay_layers(lower, cached_outputs):
        for step in range(settings.steps):
            with add_at_positions(layer_mod, delta[b.subject_rows], all_rows, b.subject_pos):
                final = base(input_ids=b.ids, attention_mask=b.mask, use_cache=False).last_hidden_state
            logp = F.log_softmax(logits_at(model, final[b.tgt_rows, b.tgt_pos]), -1)  # (P, V)
            tok_nll = -logp.gather(1, b.tgt_ids[:, None]).squeeze(1) * b.tgt_weight  # (P,)
            nll = torch.zeros(n, device=device).index_add(0, b.tgt_owner, tok_nll)  # (n,)
            kl_cur = F.log_softmax(logits_at(model, final[b.kl_rows, b.subject_pos[b.kl_rows]]), -1)
            kl = (kl_cur.exp() * (kl_cur - kl_ref)).sum(-1)  # (n,) KL(current || initial)
            decay = settings.weight_decay * delta.norm(dim=1) / h_norm**2
            loss = nll + settings.kl_factor * kl + decay

            nll_d = nll.detach()
            if step == 0:
                nll_start = nll_d.clone()
            nll_last = torch.where(active, nll_d, nll_last)
            active = active & (nll_d >= settings.early_stop_nll)
            if not bool(active.any()):
                break
            frozen = delta.detach().clone()
            opt.zero_grad(set_to_none=True)
            (loss * active).sum().backward()
            opt.step()
            steps += active.long()
            with torch.no_grad():
                # Finished requests keep their shift; Adam momentum must not move them.
                delta[~active] = frozen[~active]
                norms = delta.norm(dim=1).clamp_min(1e-12)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
    log.debug("values: %d requests, %d steps max, nll %.3f -> %.3f", n, int(steps.max()),
              float(nll_start.mean()), float(nll_last.mean()))
    return ValueResult(
        delta=delta.detach(), v0=v0, hidden=hidden, nll_start=nll_start, nll_end=nll_last, steps=steps
    )
