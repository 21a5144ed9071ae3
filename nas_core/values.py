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


def tail_groups(widths: Sequence[int], slack: int) -> list[list[int]]:
    """Request indices per v* batch: from the narrowest width up, a group takes every width at
    most ``slack`` columns above its first (``slack`` 0: one group per width), in width order."""
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    groups: list[list[int]] = []
    first = None
    for i in order:
        if first is None or widths[i] > first + slack:
            groups.append([])
            first = widths[i]
        groups[-1].append(i)
    return groups


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

    Requests are grouped by tail width (columns right of the subject, :func:`tail_groups`)
    and each group is one batch: a batch is a rectangle, so a request with a 3-token tail
    batched with one whose tail is 8 tokens would pay for 5 columns of padding in every row
    on every step (40% of a 25-request batch's columns, measured on CounterFact). Requests are
    independent, so the grouping changes only the cost (and the last bits).
    """
    rows = [_request_rows(tok, r, settings) for r in requests]
    groups = tail_groups([r.tail_width for r in rows], settings.tail_group_slack)
    if len(groups) <= 1:
        return _optimise_batch(model, spec, rows, layer, settings, pad_token_id(tok))
    parts = [(idx, _optimise_batch(model, spec, [rows[i] for i in idx], layer, settings, pad_token_id(tok)))
             for idx in groups]

    def merged(field: str) -> torch.Tensor:
        first = getattr(parts[0][1], field)
        out = first.new_empty((len(requests), *first.shape[1:]))
        for idx, res in parts:
            out[torch.tensor(idx, device=out.device)] = getattr(res, field)
        return out

    return ValueResult(**{f: merged(f) for f in ("delta", "v0", "hidden", "nll_start", "nll_end", "steps")})


@dataclass(frozen=True)
class _Clean:
    """What the clean (unshifted) pass over a whole batch gives the optimisation."""

    hidden: torch.Tensor  # (n, d) the residual stream after the layer at each bare prompt's subject (h)
    v0: torch.Tensor  # (n, d) the MLP's contribution there
    kl_ref: torch.Tensor  # (n, V) log-probabilities after each KL prompt's subject, the KL reference
    cache: object | None  # the keys/values of every column (a transformers Cache), when the head is reused
    lower_outputs: list[object]  # the tail of each block up to the layer, as it returned it (B, W - start, d)


@dataclass(frozen=True)
class _Tail:
    """What every step's forward pass needs: it recomputes the columns from ``start`` on only."""

    start: int  # first recomputed column: 0 for sliding-window models, else the subject column
    ids: torch.Tensor  # (B, W - start) token ids of the recomputed columns
    positions: torch.Tensor  # (B, W - start) their real positions
    tgt_cols: torch.Tensor  # (P,) column within the tail whose logits predict each target token
    subject_col: torch.Tensor  # (B,) the subject's column within the tail, where the shift is added
    layer_mod: nn.Module  # the block after which the shift is added
    lower: list[nn.Module]  # the blocks up to the layer, each replaying its clean tail output
    lower_outputs: list[object]  # those outputs, from ``_Clean``
    cache: object | None  # the clean pass's cache, cut back to ``head`` before every step
    head: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) of the columns left of ``start``
    cache_kw: dict  # the cache under the keyword this transformers version takes ({} without one)


@dataclass(frozen=True)
class _Live:
    """The part of a batch that is still optimising at one step."""

    rows: torch.Tensor  # (B',) batch rows of the live requests
    remap: torch.Tensor  # (B,) each batch row's index among ``rows`` (-1 for a finished request's)
    tgt: torch.Tensor  # (P,) bool, target tokens of live requests
    requests: torch.Tensor  # (n',) indices of the live requests


def _optimise_batch(
    model: nn.Module, spec: ModelSpec, requests: Sequence[_RequestRows], layer: int, settings: ValueSettings,
    pad_id: int,
) -> ValueResult:
    """:func:`optimise_values` for one rectangular batch of tokenised requests."""
    b = _build_batch(requests, settings, pad_id, next(model.parameters()).device)
    # Sliding-window attention masks depend on the whole sequence, so those models recompute
    # every column; all others recompute only the tail, right of the subject.
    start = 0 if _has_sliding_window(model.config) else b.split
    lower = _decoder_layers(model, spec, layer)
    clean = _clean_pass(model, spec, b, layer, lower, start)
    cdtype = _compute_dtype(model, settings)
    tail = _tail_inputs(model, b, clean, layer, lower, start, cdtype)
    kernel = sdpa_kernel(SDPBackend.MATH) if settings.attention == "math" else nullcontext()
    with compute_in(_upper_modules(model, spec, layer), cdtype) if cdtype is not None else nullcontext(), kernel:
        delta, nll_start, nll_last, steps = _steps(model, b, tail, settings, clean.hidden, clean.kl_ref)
    log.debug("values: %d requests, %d steps max, nll %.3f -> %.3f", len(requests), int(steps.max()),
              float(nll_start.mean()), float(nll_last.mean()))
    return ValueResult(delta=delta, v0=clean.v0, hidden=clean.hidden, nll_start=nll_start, nll_end=nll_last,
                       steps=steps)


def _clean_pass(model: nn.Module, spec: ModelSpec, b: _Batch, layer: int, lower: list[nn.Module], start: int) -> _Clean:
    """One pass over the whole rows: h and v0 at the bare prompt, the KL reference, the head's
    keys/values (cache), and the tail outputs of the blocks up to ``layer``, which the shift
    cannot change and are replayed on every step."""
    with torch.no_grad(), ExitStack() as stack:
        cap_h = stack.enter_context(capture(get_module(model, spec.layer_name(layer))))
        cap_v = stack.enter_context(capture(get_module(model, spec.mlp_name(layer))))
        lower_caps = [stack.enter_context(capture(m, outputs=False, raw=True)) for m in lower]
        clean = model.base_model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions,
                                 use_cache=start > 0)  # last_hidden_state (B, W, d)
        hidden = cap_h.outputs[0][b.bare_rows, b.split].float()  # (n, d)
        v0 = cap_v.outputs[0][b.bare_rows, b.split].float()  # (n, d)
        kl_ref = F.log_softmax(logits_at(model, clean.last_hidden_state[b.kl_rows, b.split]), -1)  # (n, V)
    cache = (getattr(clean, "cache", None) or clean.past_key_values) if start > 0 else None
    return _Clean(hidden=hidden, v0=v0, kl_ref=kl_ref, cache=cache,
                  lower_outputs=[_tail(c.raw_outputs[0], start) for c in lower_caps])


def _tail_inputs(
    model: nn.Module, b: _Batch, clean: _Clean, layer: int, lower: list[nn.Module], start: int,
    cdtype: torch.dtype | None,
) -> _Tail:
    """The columns from ``start`` on, and the cached keys/values of the columns left of it."""
    cache = clean.cache
    head = [(lay.keys[..., :start, :], lay.values[..., :start, :]) for lay in cache.layers] if cache else []
    if cdtype is not None and cache is not None:  # the upper blocks' cached head keys/values join their new ones
        head = [(k.to(cdtype), v.to(cdtype)) if i > layer else (k, v) for i, (k, v) in enumerate(head)]
    return _Tail(
        start=start,
        ids=b.ids[:, start:],  # (B, W - start)
        positions=b.positions[:, start:],  # (B, W - start)
        tgt_cols=b.tgt_cols + (b.split - start),  # (P,)
        subject_col=torch.full((b.ids.shape[0],), b.split - start, dtype=torch.long, device=b.ids.device),  # (B,)
        layer_mod=lower[-1],  # block ``layer``
        lower=lower,
        lower_outputs=clean.lower_outputs,
        cache=cache,
        head=head,
        cache_kw={_cache_kwarg(model.base_model): cache} if cache is not None else {},
    )


def _steps(model: nn.Module, b: _Batch, tail: _Tail, settings: ValueSettings, hidden: torch.Tensor,
           kl_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Adam loop of :func:`_optimise_batch`; returns (delta, nll_start, nll_last, steps)."""
    n, device = hidden.shape[0], hidden.device
    delta = torch.zeros((n, hidden.shape[1]), dtype=torch.float32, device=device, requires_grad=True)  # (n, d)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    h_norm = hidden.norm(dim=1)  # (n,)
    max_norm = settings.clamp_norm_factor * h_norm  # (n,)
    active = torch.ones(n, dtype=torch.bool, device=device)  # (n,) still optimising
    steps = torch.zeros(n, dtype=torch.long, device=device)  # (n,)
    nll_start = torch.zeros(n, device=device)  # (n,)
    nll_last = torch.zeros(n, device=device)  # (n,)

    for step in range(settings.steps):
        live = _live(b, active)
        final = _forward_tail(model, b, tail, delta, live.rows)  # (B', W - start, d)
        logp, kl_cur = _log_probs(model, b, tail, final, live)  # (P', V), (n', V)
        nll = _target_nll(b, live, logp, n, device)  # (n,)
        kl = _kl_to_reference(kl_cur, kl_ref, live, n, device)  # (n,)
        decay = _weight_decay(delta, h_norm, settings.weight_decay)  # (n,)
        loss = nll + settings.kl_factor * kl + decay  # (n,)

        nll_start, nll_last, active = _early_stop(step, nll.detach(), nll_start, nll_last, active,
                                                  settings.early_stop_nll)
        if not bool(active.any()):
            break
        frozen = delta.detach().clone()  # (n, d)
        _adam_step(opt, loss, active)
        steps += active.long()
        _keep_and_clamp_(delta, frozen, active, max_norm)
    return delta.detach(), nll_start, nll_last, steps


def _live(b: _Batch, active: torch.Tensor) -> _Live:
    """The rows and targets of the requests still optimising: a finished request costs nothing."""
    rows = active[b.subject_rows].nonzero().squeeze(1)  # (B',)
    remap = torch.full((b.ids.shape[0],), -1, dtype=torch.long, device=active.device)  # (B,)
    remap[rows] = torch.arange(rows.numel(), device=active.device)  # (B',)
    return _Live(rows=rows, remap=remap, tgt=active[b.tgt_owner], requests=active.nonzero().squeeze(1))


def _forward_tail(model: nn.Module, b: _Batch, tail: _Tail, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B', W - start, d) final hidden states of ``rows``' tail, with each row's shift added after the layer."""
    if tail.cache is not None:
        for lay, (k, v) in zip(tail.cache.layers, tail.head, strict=True):
            lay.keys, lay.values = k[rows], v[rows]  # the head only: drop last step's tail
    with replay_layers(tail.lower, [_rows(o, rows) for o in tail.lower_outputs]), add_at_positions(
        tail.layer_mod, delta[b.subject_rows[rows]], torch.arange(rows.numel(), device=rows.device),
        tail.subject_col[rows]
    ):
        return model.base_model(input_ids=tail.ids[rows], attention_mask=b.mask[rows],
                                position_ids=tail.positions[rows], use_cache=tail.cache is not None,
                                **tail.cache_kw).last_hidden_state  # (B', W - start, d)


def _log_probs(model: nn.Module, b: _Batch, tail: _Tail, final: torch.Tensor,
               live: _Live) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the live target positions (P', V) and after the live KL prompts' subject (n', V).

    One head product for both (the head is memory-bound at these few rows: two calls cost
    nearly twice one).
    """
    n_tgt = int(live.tgt.sum())
    picked = torch.cat([final[live.remap[b.tgt_rows[live.tgt]], tail.tgt_cols[live.tgt]],
                        final[live.remap[b.kl_rows[live.requests]], b.split - tail.start]])  # (P' + n', d)
    logp_all = F.log_softmax(logits_at(model, picked), -1)  # (P' + n', V)
    return logp_all[:n_tgt], logp_all[n_tgt:]


def _target_nll(b: _Batch, live: _Live, logp: torch.Tensor, n: int, device) -> torch.Tensor:
    """(n,) each request's weighted mean NLL of its target tokens (0 for a finished request)."""
    tok_nll = -logp.gather(1, b.tgt_ids[live.tgt, None]).squeeze(1) * b.tgt_weight[live.tgt]  # (P',)
    return torch.zeros(n, device=device).index_add(0, b.tgt_owner[live.tgt], tok_nll)  # (n,)


def _kl_to_reference(kl_cur: torch.Tensor, kl_ref: torch.Tensor, live: _Live, n: int, device) -> torch.Tensor:
    """(n,) KL(current || initial) after each KL prompt's subject (0 for a finished request)."""
    kl_live = (kl_cur.exp() * (kl_cur - kl_ref[live.requests])).sum(-1)  # (n',)
    return torch.zeros(n, device=device).index_put((live.requests,), kl_live)  # (n,)


def _weight_decay(delta: torch.Tensor, h_norm: torch.Tensor, factor: float) -> torch.Tensor:
    """(n,) ``factor`` * ||delta|| / ||h||^2."""
    return factor * delta.norm(dim=1) / h_norm**2  # (n,)


def _early_stop(
    step: int, nll: torch.Tensor, nll_start: torch.Tensor, nll_last: torch.Tensor, active: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Record this step's (detached) NLL and stop the requests below ``threshold``.

    Returns (nll_start, nll_last, active): the NLL at step 0, the last NLL each request
    was evaluated at while optimising, and which requests still optimise.
    """
    if step == 0:
        nll_start = nll.clone()  # (n,)
    nll_last = torch.where(active, nll, nll_last)  # (n,)
    active = active & (nll >= threshold)  # (n,)
    return nll_start, nll_last, active


def _adam_step(opt: torch.optim.Optimizer, loss: torch.Tensor, active: torch.Tensor) -> None:
    """One Adam step on the summed loss of the requests still optimising."""
    opt.zero_grad(set_to_none=True)
    (loss * active).sum().backward()
    opt.step()


@torch.no_grad()
def _keep_and_clamp_(delta: torch.Tensor, frozen: torch.Tensor, active: torch.Tensor, max_norm: torch.Tensor) -> None:
    """In place: finished requests keep their shift (Adam momentum must not move them) and
    every shift is scaled back to at most ``max_norm``."""
    delta[~active] = frozen[~active]  # (n, d)
    norms = delta.norm(dim=1).clamp_min(1e-12)  # (n,)
    scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))  # (n,)
    delta.mul_(scale[:, None])  # (n, d)
