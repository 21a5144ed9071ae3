"""Scoped forward hooks. Every hook is removed in ``finally``, so none outlives its block.

:func:`hooks` is the one place that registers and removes forward hooks (after
TransformerLens's ``HookedRootModule.hooks()``); the helpers below build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nas_core.spec import get_module

ForwardHook = Callable[[nn.Module, tuple, Any], Any]
"""``fn(module, args, output)``; a return value other than None replaces the output."""


@contextmanager
def hooks(root: nn.Module, fwd_hooks: Sequence[tuple[str | nn.Module, ForwardHook]]) -> Iterator[nn.Module]:
    """Install forward hooks for the ``with`` block and remove them however it ends.

    Args:
        root: the model the names are resolved in.
        fwd_hooks: ``(where, fn)`` pairs, installed in order: ``where`` is a dotted module
            name under ``root`` (``""`` is ``root`` itself) or a module. A module may appear
            more than once; its hooks run in the order given.

    Yields ``root``. If a name does not resolve, the hooks installed so far are removed.
    """
    handles = []
    try:
        for where, fn in fwd_hooks:
            module = get_module(root, where) if isinstance(where, str) else where
            handles.append(module.register_forward_hook(fn))
        yield root
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(output: object) -> torch.Tensor:
    # Decoder layers return a tensor in some transformers versions and a tuple in others.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _replace_first(output: object, new: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


@dataclass
class Captured:
    """What :func:`capture` recorded: one entry per forward call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    raw_outputs: list[object] = field(default_factory=list)


@contextmanager
def capture(
    module: nn.Module,
    *,
    inputs: bool = False,
    outputs: bool = True,
    raw: bool = False,
    detach: bool = True,
) -> Iterator[Captured]:
    """Record the first positional input and/or the (first) output of ``module``.

    ``raw=True`` also keeps the output object exactly as returned (tensor or tuple), for
    :func:`replay_layers`.
    """
    record = Captured()

    def hook(_mod: nn.Module, args: tuple, out: object) -> None:
        if inputs:
            x = args[0]
            record.inputs.append(x.detach() if detach else x)
        if outputs:
            y = _first_tensor(out)
            record.outputs.append(y.detach() if detach else y)
        if raw:
            record.raw_outputs.append(out)

    with hooks(module, [("", hook)]):
        yield record


@contextmanager
def add_at_positions(
    module: nn.Module, vectors: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> Iterator[None]:
    """Add ``vectors[i]`` to the module output at ``(rows[i], positions[i])``.

    Args:
        vectors: (m, d) vectors to add (may require grad).
        rows: (m,) batch rows.
        positions: (m,) token positions.
    """

    def hook(_mod: nn.Module, _args: tuple, out: object) -> object:
        hidden = _first_tensor(out)
        # index_put with accumulate keeps autograd through ``vectors``.
        hidden = hidden.index_put((rows, positions), vectors.to(hidden.dtype), accumulate=True)
        return _replace_first(out, hidden)

    with hooks(module, [("", hook)]):
        yield


class StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward pass early."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort the forward pass right after ``module`` ran; the caller catches nothing.

    The exception is swallowed by this context manager, so code inside the ``with``
    block simply continues after the model call.
    """

    def hook(_mod: nn.Module, _args: tuple, _out: object) -> None:
        raise StopForward

    try:
        with hooks(module, [("", hook)]):
            yield
    except StopForward:
        pass


@contextmanager
def replay_layers(layers: Sequence[nn.Module], outputs: Sequence[object]) -> Iterator[None]:
    """Make each of ``layers`` return a cached output instead of computing it.

    Used by the value optimisation: layers below the edit point do not depend on the
    optimised vectors, so their outputs are computed once and replayed on every step.
    """
    # An instance may already carry its own ``forward`` (e.g. an accelerate hook): keep it.
    own = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer, out in zip(layers, outputs, strict=True):
            layer.forward = (lambda cached: (lambda *a, **k: cached))(out)  # type: ignore[method-assign]
        yield
    finally:
        for layer, fwd in zip(layers, own, strict=True):
            if fwd is None:
                layer.__dict__.pop("forward", None)  # the class method shows through again
            else:
                layer.forward = fwd  # type: ignore[method-assign]


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


@contextmanager
def compute_in(modules: Sequence[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Run ``modules`` in ``dtype``: their parameters and floating buffers are swapped for
    ``dtype`` copies and every floating input is cast on entry; the originals (the very
    tensors) are put back on exit, so the model is bit-for-bit what it was.

    Used for the mixed-precision value optimisation: the frozen blocks above the edit layer
    compute in bfloat16 where the hardware does so natively, while the shift, the loss and
    Adam stay in float32 (gradients flow through the casts). The copies are views of one
    buffer per device (:func:`_packed_copies`).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    try:
        seen: set[int] = set()
        swapped = []
        for module in modules:
            for t in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
                if t.is_floating_point() and t.dtype != dtype and id(t) not in seen:
                    seen.add(id(t))
                    swapped.append(t)
        for t, copy in zip(swapped, _packed_copies([t.data for t in swapped], dtype), strict=True):
            saved.append((t, t.data))
            t.data = copy
        for module in modules:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs: (_cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}),
                with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for tensor, original in saved:
            tensor.data = original


_PACK_ALIGN = 64  # elements: each copy starts a multiple of 128 bytes (bfloat16) into the buffer


def _packed_copies(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]`` (the same values), each a contiguous view of one buffer
    per device.

    One allocation instead of one per tensor: for SmolLM2's upper blocks it is ~210 MB, which
    the C allocator maps and unmaps as a whole, so its pages go back to the OS when the block
    ends; a hundred separate copies of 1-2 MB stay in the heap after they are freed, under the
    next phase's peak."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for device in dict.fromkeys(t.device for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.device == device]
        starts, total = [], 0
        for i in idx:
            starts.append(total)
            total += -(-tensors[i].numel() // _PACK_ALIGN) * _PACK_ALIGN
        flat = torch.empty(total, dtype=dtype, device=device)
        for i, start in zip(idx, starts, strict=True):
            view = flat[start : start + tensors[i].numel()].view(tensors[i].shape)
            view.copy_(tensors[i])
            out[i] = view
    return out  # type: ignore[return-value]
