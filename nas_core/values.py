"""Target values v*: the residual shift that makes the model say the new target.

MEMIT's ``compute_z``, batched: every request of a batch shares each forward/backward,
keeps its own shift delta_i, its own clamp and its own early stop. Because requests
live in separate rows and the loss is a *sum* over requests, each delta_i gets exactly
the gradient it would get alone; Adam is element-wise, so batching changes speed, not
the answer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nas_core.hooks import add_at_positions, capture, compute_in, replay_layers
from nas_core.prompts import TokenisedPrompt, pad_token_id, target_ids, tokenise
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
    """All rows of a batch, left-padded so every row's subject token sits in column ``split``.

    Nothing left of the subject depends on the shift, so the optimisation only recomputes
    the columns from ``split`` on (the *tail*) and reuses the cached keys/values of the head.
    """

    ids: torch.Tensor  # (B, W) aligned token ids
    mask: torch.Tensor  # (B, W) 1 on real tokens
    positions: torch.Tensor  # (B, W) real position of each column (0 on padding)
    split: int  # the subject column, the same in every row
    subject_rows: torch.Tensor  # (B,) request index of each row
    tgt_rows: torch.Tensor  # (P,) row of each predicted target token
    tgt_cols: torch.Tensor  # (P,) tail column whose logits predict it
    tgt_ids: torch.Tensor  # (P,) the target token
    tgt_owner: torch.Tensor  # (P,) request index
    tgt_weight: torch.Tensor  # (P,) 1 / (tokens in its row * rows of its request)
    kl_rows: torch.Tensor  # (n,) row of each request's KL prompt
    bare_rows: torch.Tensor  # (n,) row of each request's bare prompt


@dataclass(frozen=True)
class _RequestRows:
    """One request's tokenised rows: the target prompt under every context prefix, and the KL prompt."""

    target: tuple[int, ...]
    prefixed: tuple[TokenisedPrompt, ...]  # one per settings.prefixes, the bare prompt first
    kl: TokenisedPrompt

    @property
    def tail_width(self) -> int:
        """Columns from the subject's last token to the end, the most over the rows."""
        return max(len(r.ids) - r.subject_pos for r in (*self.prefixed, self.kl))


def _request_rows(tok, req: EditRequest, settings: ValueSettings) -> _RequestRows:
    tgt = tuple(target_ids(tok, req.target_new))
    prefixed = tuple(tokenise(tok, prefix, req.prompt, req.subject, tgt) for prefix in settings.prefixes)
    return _RequestRows(target=tgt, prefixed=prefixed, kl=tokenise(tok, "", settings.kl_prompt, req.subject))


def _stack_rows(
    requests: Sequence[_RequestRows], n_ctx: int,
) -> tuple[list[TokenisedPrompt], list[int], list[int], list[int], list[tuple[int, int, int, float]]]:
    """Every request's prefixed rows (the bare one first), then every request's KL row.

    Returns (rows, owners, bare_rows, kl_rows, targets): the request index of each row, the
    row of each request's bare and KL prompt, and each target token as (row, position,
    token, weight), its weight 1 / (tokens in its row * rows of its request).
    """
    rows: list[TokenisedPrompt] = []
    owners: list[int] = []
    bare_rows: list[int] = []
    targets: list[tuple[int, int, int, float]] = []  # (row, position, token, weight)
    for i, req in enumerate(requests):
        tgt = req.target
        for j, p in enumerate(req.prefixed):
            if j == 0:
                bare_rows.append(len(rows))
            for k, t in enumerate(tgt):
                targets.append((len(rows), p.target_start - 1 + k, t, 1.0 / (len(tgt) * n_ctx)))
            rows.append(p)
            owners.append(i)
    kl_rows = []
    for i, req in enumerate(requests):
        kl_rows.append(len(rows))
        rows.append(req.kl)
        owners.append(i)
    return rows, owners, bare_rows, kl_rows, targets


def _left_align(
    rows: Sequence[TokenisedPrompt], pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[int]]:
    """Left-pad ``rows`` so every subject token sits in one column; (ids, mask, positions, split, shift)."""
    split = max(r.subject_pos for r in rows)
    shift = [split - r.subject_pos for r in rows]  # padding columns left of each row
    width = split + max(len(r.ids) - r.subject_pos for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, W)
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # (B, W)
    for row, (r, sh) in enumerate(zip(rows, shift, strict=True)):
        ids[row, sh : sh + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)  # (T,)
        mask[row, sh : sh + len(r.ids)] = 1
        positions[row, sh : sh + len(r.ids)] = torch.arange(len(r.ids))  # (T,)
    return ids, mask, positions, split, shift


def _build_batch(requests: Sequence[_RequestRows], settings: ValueSettings, pad_id: int, device) -> _Batch:
    rows, owners, bare_rows, kl_rows, targets = _stack_rows(requests, len(settings.prefixes))
    ids, mask, positions, split, shift = _left_align(rows, pad_id)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return _Batch(
        ids=ids.to(device),
        mask=mask.to(device),
        positions=positions.to(device),
        split=split,
        subject_rows=t(owners),
        tgt_rows=t([r for r, _, _, _ in targets]),
        tgt_cols=t([p + shift[r] - split for r, p, _, _ in targets]),
        tgt_ids=t([tk for _, _, tk, _ in targets]),
        tgt_owner=t([owners[r] for r, _, _, _ in targets]),
        tgt_weight=t([w for _, _, _, w in targets], torch.float32),
        kl_rows=t(kl_rows),
        bare_rows=t(bare_rows),
    )


class _Unembed(torch.autograd.Function):
    """logits = h W^T computed as (W h^T)^T, with the gradient for h only (W is frozen).

    The same product, but MKL runs the tall (vocab x d) @ (d x m) form 1.1-3.5x faster than
    F.linear's (m x d) @ (d x vocab) on this CPU for every m measured (1 to 1024 rows of
    SmolLM2's 49152 x 576 head; 3.4x at the 6-7 rows one v* step scores).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (m, d), (V, d) -> (m, V)
        ctx.save_for_backward(weight)
        return (weight @ hidden.T).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


def logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and Gemma's logit soft-cap) to selected final hidden states.

    Args:
        hidden: (m, d_model) or (..., d_model) final hidden states.
    """
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.bias is None and hidden.dim() == 2 and not head.weight.requires_grad:
        logits = _Unembed.apply(hidden, head.weight).float()
    else:
        logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _has_sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True) is not False


def _cache_kwarg(base: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _tail(output: object, split: int) -> object:
    """The columns from ``split`` on of a block's output (tensor or tuple of tensors)."""
    if isinstance(output, tuple):
        return (output[0][:, split:], *output[1:])
    return output[:, split:]


def _rows(output: object, rows: torch.Tensor) -> object:
    """Select batch rows of a block's output (tensor or tuple of tensors)."""
    if isinstance(output, tuple):
        return (output[0][rows], *output[1:])
    return output[rows]


def _decoder_layers(model: nn.Module, spec: ModelSpec, upto: int) -> list[nn.Module]:
    return [get_module(model, spec.layer_name(i)) for i in range(upto + 1)]


def _compute_dtype(model: nn.Module, settings: ValueSettings) -> torch.dtype | None:
    """The dtype the upper blocks compute in when it differs from the weights' (else None)."""
    if settings.compute_dtype == "auto":
        raise ValueError("values.compute_dtype 'auto' must be resolved to float32 or bfloat16 before editing")
    weights = next(model.parameters()).dtype
    wanted = torch.bfloat16 if settings.compute_dtype == "bfloat16" else torch.float32
    return wanted if weights == torch.float32 and wanted != weights else None


def _upper_modules(model: nn.Module, spec: ModelSpec, layer: int) -> list[nn.Module]:
    """The blocks above ``layer``, the final norm and the head: what the shift's gradient passes."""
    n_layers = model.config.get_text_config().num_hidden_layers
    blocks = [get_module(model, spec.layer_name(i)) for i in range(layer + 1, n_layers)]
    return [*blocks, get_module(model, spec.final_norm), get_module(model, spec.lm_head)]


def tail_width(tok, request: EditRequest, settings: ValueSettings) -> int:
    """Columns from the subject's last token to the end, over the request's rows (the most of them)."""
    return _request_rows(tok, request, settings).tail_width


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

    Requests are grouped by tail width (columns right of the subject) and each group is
    one batch: a batch is a rectangle, so a request with a 3-token tail batched with one
    whose tail is 8 tokens would pay for 5 columns of padding in every row on every step
    (40% of a 25-request batch's columns, measured on CounterFact). Requests are
    independent, so the grouping changes only the cost.
    """
    rows = [_request_rows(tok, r, settings) for r in requests]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.tail_width, []).append(i)
    if len(groups) <= 1:
        return _optimise_batch(model, spec, rows, layer, settings, pad_token_id(tok))
    parts = [(idx, _optimise_batch(model, spec, [rows[i] for i in idx], layer, settings, pad_token_id(tok)))
             for _, idx in sorted(groups.items())]

    def merged(field: str) -> torch.Tensor:
        first = getattr(parts[0][1], field)
        out = first.new_empty((len(requests), *first.shape[1:]))
        for idx, res in parts:
            out[torch.tensor(idx, device=out.device)] = getattr(res, field)
        return out

    return ValueResult(**{f: merged(f) for f in ("delta", "v0", "hidden", "nll_start", "nll_end", "steps")})


def _optimise_batch(
    model: nn.Module, spec: ModelSpec, requests: Sequence[_RequestRows], layer: int, settings: ValueSettings,
    pad_id: int,
) -> ValueResult:
    """:func:`optimise_values` for one rectangular batch of tokenised requests."""
    device = next(model.parameters()).device
    b = _build_batch(requests, settings, pad_id, device)
    n = len(requests)
    layer_mod = get_module(model, spec.layer_name(layer))
    mlp_mod = get_module(model, spec.mlp_name(layer))
    base = model.base_model
    n_rows = b.ids.shape[0]
    # Sliding-window attention masks depend on the whole sequence, so those models recompute
    # every column; all others recompute only the tail, right of the subject.
    start = 0 if _has_sliding_window(model.config) else b.split
    subject_col = torch.full((n_rows,), b.split - start, dtype=torch.long, device=device)

    # One clean pass over the whole rows: h and v0 at the bare prompt, the KL reference, the
    # head's keys/values (cache), and the tail outputs of the blocks up to ``layer``, which
    # the shift cannot change and are replayed on every step.
    lower = _decoder_layers(model, spec, layer)
    with torch.no_grad(), ExitStack() as stack:
        cap_h = stack.enter_context(capture(layer_mod))
        cap_v = stack.enter_context(capture(mlp_mod))
        lower_caps = [stack.enter_context(capture(m, outputs=False, raw=True)) for m in lower]
        clean = base(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=start > 0)
        hidden = cap_h.outputs[0][b.bare_rows, b.split].float()  # (n, d)
        v0 = cap_v.outputs[0][b.bare_rows, b.split].float()  # (n, d)
        kl_ref = F.log_softmax(logits_at(model, clean.last_hidden_state[b.kl_rows, b.split]), -1)
    cache = (getattr(clean, "cache", None) or clean.past_key_values) if start > 0 else None
    head = [(lay.keys[..., :start, :], lay.values[..., :start, :]) for lay in cache.layers] if cache else []
    cache_kw = {_cache_kwarg(base): cache} if cache is not None else {}
    tail_outputs = [_tail(c.raw_outputs[0], start) for c in lower_caps]
    tail_ids, tail_pos = b.ids[:, start:], b.positions[:, start:]
    tgt_cols = b.tgt_cols + (b.split - start)

    cdtype = _compute_dtype(model, settings)
    if cdtype is not None and cache is not None:  # the upper blocks' cached head keys/values join their new ones
        head = [(k.to(cdtype), v.to(cdtype)) if i > layer else (k, v) for i, (k, v) in enumerate(head)]
    kernel = sdpa_kernel(SDPBackend.MATH) if settings.attention == "math" else nullcontext()
    with compute_in(_upper_modules(model, spec, layer), cdtype) if cdtype is not None else nullcontext(), kernel:
        delta, nll_start, nll_last, steps = _steps(
            model, b, settings, layer_mod, lower, tail_outputs, tail_ids, tail_pos, tgt_cols, start, subject_col,
            cache, head, cache_kw, hidden, kl_ref)
    log.debug("values: %d requests, %d steps max, nll %.3f -> %.3f", n, int(steps.max()),
              float(nll_start.mean()), float(nll_last.mean()))
    return ValueResult(delta=delta, v0=v0, hidden=hidden, nll_start=nll_start, nll_end=nll_last, steps=steps)


def _steps(model, b: _Batch, settings: ValueSettings, layer_mod, lower, tail_outputs, tail_ids, tail_pos, tgt_cols,
           start: int, subject_col, cache, head, cache_kw, hidden, kl_ref):
    """The Adam loop of :func:`_optimise_batch`; returns (delta, nll_start, nll_last, steps)."""
    base, device, n = model.base_model, hidden.device, hidden.shape[0]
    delta = torch.zeros((n, hidden.shape[1]), dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    h_norm = hidden.norm(dim=1)  # (n,)
    max_norm = settings.clamp_norm_factor * h_norm
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    nll_start = torch.zeros(n, device=device)
    nll_last = torch.zeros(n, device=device)

    for step in range(settings.steps):
        # Only rows of requests still optimising are computed: a finished request costs nothing.
        rows = active[b.subject_rows].nonzero().squeeze(1)  # (B',)
        remap = torch.full((b.ids.shape[0],), -1, dtype=torch.long, device=device)
        remap[rows] = torch.arange(rows.numel(), device=device)
        live_tgt = active[b.tgt_owner]
        live = active.nonzero().squeeze(1)  # (n',)
        if cache is not None:
            for lay, (k, v) in zip(cache.layers, head, strict=True):
                lay.keys, lay.values = k[rows], v[rows]  # the head only: drop last step's tail
        with replay_layers(lower, [_rows(o, rows) for o in tail_outputs]), add_at_positions(
            layer_mod, delta[b.subject_rows[rows]], torch.arange(rows.numel(), device=device), subject_col[rows]
        ):
            final = base(input_ids=tail_ids[rows], attention_mask=b.mask[rows], position_ids=tail_pos[rows],
                         use_cache=cache is not None, **cache_kw).last_hidden_state  # (B', W - start, d)
        # One head product for the target positions and the KL positions together (the head is
        # memory-bound at these few rows: two calls cost nearly twice one).
        n_tgt = int(live_tgt.sum())
        picked = torch.cat([final[remap[b.tgt_rows[live_tgt]], tgt_cols[live_tgt]],
                            final[remap[b.kl_rows[live]], b.split - start]])  # (P' + n', d)
        logp_all = F.log_softmax(logits_at(model, picked), -1)
        logp, kl_cur = logp_all[:n_tgt], logp_all[n_tgt:]
        tok_nll = -logp.gather(1, b.tgt_ids[live_tgt, None]).squeeze(1) * b.tgt_weight[live_tgt]  # (P',)
        nll = torch.zeros(n, device=device).index_add(0, b.tgt_owner[live_tgt], tok_nll)  # (n,)
        kl_live = (kl_cur.exp() * (kl_cur - kl_ref[live])).sum(-1)  # (n',) KL(current || initial)
        kl = torch.zeros(n, device=device).index_put((live,), kl_live)
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
    return delta.detach(), nll_start, nll_last, steps
