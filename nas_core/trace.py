"""Causal tracing of MLP states (ROME, arXiv 2202.05262, section 2.1): where is a fact recalled?

For a prompt whose answer the model knows, the subject's input embeddings are corrupted
with Gaussian noise, which destroys the answer. Then, one layer window at a time, the
MLP outputs at the subject's last token are restored to their clean values. The rise of
p(answer) over the corrupted run is that window's *indirect effect*. Locate-and-edit
methods write their update where this effect is large, so the editors' layers are chosen
from this curve (and checked with the r-ROME per-layer sweep).

One forward pass per request does everything: row 0 is clean, and because its MLP
outputs are computed in the same pass, each restore hook copies them from row 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nas_core.evaluate.scoring import next_token_logprobs
from nas_core.hooks import ForwardHook, hooks
from nas_core.prompts import encode, fill, subject_last_token, target_ids
from nas_core.requests import EditRequest
from nas_core.settings import TraceSettings
from nas_core.spec import ModelSpec
from nas_core.values import logits_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseTrace:
    """One request's trace.

    Attributes:
        case_id: the request's id.
        p_clean: p(answer) on the clean prompt.
        p_corrupt: p(answer) with the subject corrupted, mean over noise samples.
        p_restored: (n_layers,) p(answer) with the MLP window centred on each layer restored.
    """

    case_id: str
    p_clean: float
    p_corrupt: float
    p_restored: torch.Tensor

    @property
    def indirect_effect(self) -> torch.Tensor:
        """(n_layers,) p_restored - p_corrupt."""
        return self.p_restored - self.p_corrupt


@dataclass(frozen=True)
class TraceResult:
    """Mean over the traced requests.

    Attributes:
        cases: every traced request.
        indirect_effect: (n_layers,) mean indirect effect of restoring each layer's window.
        noise_std: the standard deviation of the noise added to subject embeddings.
    """

    cases: tuple[CaseTrace, ...]
    indirect_effect: torch.Tensor
    noise_std: float

    @property
    def mean_p_clean(self) -> float:
        return sum(c.p_clean for c in self.cases) / len(self.cases)

    @property
    def mean_p_corrupt(self) -> float:
        return sum(c.p_corrupt for c in self.cases) / len(self.cases)


def restore_window(layer: int, n_layers: int, window: int) -> range:
    """Layers restored for the window centred on ``layer`` (ROME: ``layer - w//2 .. layer + w - w//2``)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window))


def best_band(effect: torch.Tensor, width: int, lowest: int = 0) -> tuple[int, ...]:
    """The ``width`` consecutive layers from ``lowest`` up with the largest summed indirect effect.

    Args:
        effect: (n_layers,) indirect effect per layer.
        lowest: the lowest layer a band may start at. ``first_mlp_free(window)`` leaves out
            every window that restores layer 0, whose MLP in some models acts on the token
            itself (SmolLM2: layer 0 alone carries 0.055 of a peak 0.058), so its effect says
            where the token is read, not where the fact is.
    """
    if not 1 <= width <= effect.numel() - lowest:
        raise ValueError(f"band width {width} must be in 1..{effect.numel() - lowest} (from layer {lowest})")
    sums = effect[lowest:].unfold(0, width, 1).sum(dim=1)  # (n_layers - lowest - width + 1,)
    start = lowest + int(sums.argmax())
    return tuple(range(start, start + width))


def first_mlp_free(window: int) -> int:
    """The lowest centre whose restore window (see :func:`restore_window`) leaves layer 0 out."""
    return window // 2 + 1


def subject_span(tok, prompt: str, subject: str) -> tuple[int, int]:
    """(first, last) token index of the subject in the filled prompt (BOS counted)."""
    text = fill(prompt, subject)
    start = prompt.index("{}")
    last = subject_last_token(tok, text, start + len(subject))
    # Count the tokens before the subject. The space before it belongs to the subject's first
    # token (" Danielle"), so it is left out; a BOS-adding tokenizer encodes "" as [BOS].
    first = len(encode(tok, text[:start].rstrip()))
    return min(first, last), last


def _noise_hook(first: int, last: int, noise: torch.Tensor) -> ForwardHook:
    """An embedding hook adding ``noise[row - 1]`` to rows 1.. at tokens first..last."""

    def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[1:, first : last + 1] += noise.to(out.dtype)
        return out

    return hook


def _restore_hook(rows: torch.Tensor, position: int) -> ForwardHook:
    """A hook overwriting its module's output at (rows, position) with row 0's (the clean run's) value."""

    def hook(_mod: nn.Module, _args: tuple, out: object) -> object:
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        hidden[rows, position] = hidden[0, position]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    return hook


def embedding_noise_std(model: nn.Module, tok, requests: Sequence[EditRequest]) -> float:
    """Standard deviation of the embedding layer's outputs over the requests' subject tokens.

    ROME scales its noise by the spread of subject embeddings; measuring the embedding
    module's *output* includes any scaling the model applies (Gemma multiplies by sqrt(d)).
    """
    device = next(model.parameters()).device
    ids = [t for r in requests for t in tok(r.subject, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([ids], device=device))
    return float(emb.float().std())


def answer_probability(model: nn.Module, tok, requests: Sequence[EditRequest], batch_size: int = 32) -> torch.Tensor:
    """(n,) p(first token of ``target_true``) after each filled prompt: how well the model knows it.

    Tracing needs facts the model actually recalls; callers trace the most probable ones.
    """
    answers = [[target_ids(tok, r.target_true)[0]] for r in requests]
    logp = next_token_logprobs(model, tok, [r.filled_prompt for r in requests], answers, batch_size)
    return torch.cat(logp).exp()


@torch.no_grad()
def trace_request(
    model: nn.Module, tok, spec: ModelSpec, request: EditRequest, settings: TraceSettings, noise_std: float,
    generator: torch.Generator,
) -> CaseTrace:
    """Trace one request: 1 clean row, ``samples`` corrupted rows, ``samples`` per layer restored.

    The answer is the first token of ``request.target_true`` (the fact the model knows).
    """
    device = next(model.parameters()).device
    n_layers = model.config.num_hidden_layers
    s = settings.samples
    first, last = subject_span(tok, request.prompt, request.subject)
    ids = encode(tok, fill(request.prompt, request.subject))
    answer = target_ids(tok, request.target_true)[0]
    rows = 1 + s + s * n_layers  # clean | corrupted | corrupted + restore(layer 0) | ... | restore(layer L-1)
    batch = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    d = model.get_input_embeddings().embedding_dim
    noise = torch.randn((s, last - first + 1, d), generator=generator, device="cpu").to(device)
    noise = noise * settings.noise_factor * noise_std  # (samples, subject tokens, d_model)
    noise = noise.repeat(1 + n_layers, 1, 1)  # the same draws in the corrupted and every restored group

    fwd_hooks: list[tuple[str | nn.Module, ForwardHook]] = [
        (model.get_input_embeddings(), _noise_hook(first, last, noise))]
    for j in range(n_layers):
        # Rows restoring at block j: every centre layer whose window contains j.
        centres = [c for c in range(n_layers) if j in restore_window(c, n_layers, settings.window)]
        restored = torch.tensor([1 + s + c * s + k for c in centres for k in range(s)], device=device)
        fwd_hooks.append((spec.mlp_name(j), _restore_hook(restored, last)))
    with hooks(model, fwd_hooks):
        out = model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    probs = torch.softmax(logits_at(model, out.last_hidden_state[:, -1]), dim=-1)[:, answer]  # (rows,)
    restored_p = probs[1 + s :].view(n_layers, s).mean(dim=1)
    return CaseTrace(case_id=request.case_id, p_clean=float(probs[0]), p_corrupt=float(probs[1 : 1 + s].mean()),
                     p_restored=restored_p.cpu())


def causal_trace(
    model: nn.Module, tok, spec: ModelSpec, requests: Sequence[EditRequest], settings: TraceSettings,
    progress: Callable[[int], None] | None = None,
) -> TraceResult:
    """Trace every request and average the indirect effects.

    ``progress(1)`` is called after each request.
    """
    if not requests:
        raise ValueError("no requests to trace")
    noise_std = embedding_noise_std(model, tok, requests)
    generator = torch.Generator().manual_seed(settings.seed)
    cases = []
    for req in requests:
        cases.append(trace_request(model, tok, spec, req, settings, noise_std, generator))
        if progress is not None:
            progress(1)
    effect = torch.stack([c.indirect_effect for c in cases]).mean(dim=0)
    log.info("causal trace over %d requests: p clean %.3f, corrupted %.3f, peak effect %.3f at layer %d",
             len(cases), sum(c.p_clean for c in cases) / len(cases), sum(c.p_corrupt for c in cases) / len(cases),
             float(effect.max()), int(effect.argmax()))
    return TraceResult(cases=tuple(cases), indirect_effect=effect, noise_std=noise_std)
