"""Keys K: inputs of the MLP output projection at the subject's last token.

Each key is averaged over the bare prompt and the context prefixes, and that *same*
averaged key is used in every place of every update (prefix-consistent keys, the fix of
"The Fall of ROME"). One forward pass serves all requests, all prefixes and all layers,
and stops right after the deepest layer it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from nas_core.hooks import capture, replay_layers, stop_after
from nas_core.prompts import pad_batch, pad_token_id, tokenise
from nas_core.requests import EditRequest
from nas_core.spec import ModelSpec, get_module


@dataclass(frozen=True)
class SubjectReadout:
    """Activations read at the subject's last token.

    Attributes:
        keys: layer -> (n, d_in) projection inputs, averaged over prefixes.
        hidden: (n, d_model) residual stream after ``readout_layer`` on the bare prompt (H).
        mlp_out: (n, d_model) the MLP's contribution at ``readout_layer`` on the bare prompt (v0).
        block_outputs: what blocks 0..deepest returned (as returned), when asked for with
            ``keep_block_outputs``: a later read can replay the blocks that did not change.
    """

    keys: dict[int, torch.Tensor]
    hidden: torch.Tensor | None
    mlp_out: torch.Tensor | None
    block_outputs: tuple[object, ...] = ()


@torch.no_grad()
def read_at_subject(
    model: nn.Module,
    tok,
    spec: ModelSpec,
    requests: Sequence[EditRequest],
    key_layers: Sequence[int],
    prefixes: Sequence[str],
    readout_layer: int | None = None,
    replay: Sequence[object] = (),
    keep_block_outputs: bool = False,
) -> SubjectReadout:
    """Keys for ``key_layers`` and (optionally) H and v0 at ``readout_layer``, in one pass.

    Args:
        prefixes: context prefixes; the first should be ``""`` (the bare prompt), which is
            also the row H and v0 are read from.
        replay: outputs of blocks 0..len(replay)-1 from an earlier read of the same requests
            whose weights have not changed since: those blocks return them instead of
            computing (the result is bit-identical, the work is not done twice). Every key
            and readout layer must lie above them.
        keep_block_outputs: return every block's output in ``block_outputs``.
    """
    if not prefixes or prefixes[0] != "":
        raise ValueError("the first context prefix must be '' (the bare prompt)")
    device = next(model.parameters()).device
    rows = [tokenise(tok, p, r.prompt, r.subject) for r in requests for p in prefixes]
    ids, mask = pad_batch(rows, pad_token_id(tok), device)
    pos = torch.tensor([r.subject_pos for r in rows], device=device)
    arange = torch.arange(len(rows), device=device)
    n, m = len(requests), len(prefixes)

    deepest = max([*key_layers, readout_layer if readout_layer is not None else -1])
    if replay and min([*key_layers, *([readout_layer] if readout_layer is not None else [])]) < len(replay):
        raise ValueError("a replayed block cannot be read: every key and readout layer must lie above the replay")
    blocks = [get_module(model, spec.layer_name(i)) for i in range(deepest + 1)]
    with ExitStack() as stack:
        if replay:
            stack.enter_context(replay_layers(blocks[: len(replay)], replay))
        cap_blocks = [stack.enter_context(capture(b, outputs=False, raw=True)) for b in blocks] \
            if keep_block_outputs else []
        cap_keys = {
            layer: stack.enter_context(
                capture(get_module(model, spec.proj_name(layer)), inputs=True, outputs=False)
            )
            for layer in key_layers
        }
        cap_hidden = cap_mlp = None
        if readout_layer is not None:
            cap_hidden = stack.enter_context(capture(get_module(model, spec.layer_name(readout_layer))))
            cap_mlp = stack.enter_context(capture(get_module(model, spec.mlp_name(readout_layer))))
        # Stop after the deepest block we read: nothing above it matters here.
        stack.enter_context(stop_after(get_module(model, spec.layer_name(deepest))))
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    keys = {}
    for layer, rec in cap_keys.items():
        at_subject = rec.inputs[0][arange, pos].float()  # (n*m, d_in)
        keys[layer] = at_subject.view(n, m, -1).mean(dim=1)  # (n, d_in)
    hidden = mlp_out = None
    if readout_layer is not None:
        bare = arange.view(n, m)[:, 0]
        hidden = cap_hidden.outputs[0][bare, pos[bare]].float()  # (n, d_model)
        mlp_out = cap_mlp.outputs[0][bare, pos[bare]].float()
    return SubjectReadout(keys=keys, hidden=hidden, mlp_out=mlp_out,
                          block_outputs=tuple(c.raw_outputs[0] for c in cap_blocks))
