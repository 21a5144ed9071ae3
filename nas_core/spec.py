"""Where each architecture keeps the modules that locate-and-edit methods touch.

A :class:`ModelSpec` holds dotted-name templates with one ``{}`` for the layer index.
Routing is by ``config.model_type`` only (never by a substring of the model name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnknownArchitectureError(ValueError):
    """Raised for a ``model_type`` that has no :class:`ModelSpec`."""


@dataclass(frozen=True)
class ModelSpec:
    """Module name templates for one architecture.

    Attributes:
        model_type: ``config.model_type`` this spec applies to.
        layer: the decoder block; its output is the residual stream after layer ``{}``.
        mlp: the module whose output is the MLP's contribution to the residual stream
            (v0 in the NAS paper). For Gemma this is the post-feed-forward norm.
        mlp_out_proj: the MLP output projection W_l whose weight the editors change.
        final_norm: the norm before the language-model head.
        lm_head: the unembedding.
        transposed: True when the projection stores its weight as (d_in, d_out)
            (GPT-2's ``Conv1D``); editors always reason in (d_out, d_in).
    """

    model_type: str
    layer: str
    mlp: str
    mlp_out_proj: str
    final_norm: str
    lm_head: str
    transposed: bool = False

    def layer_name(self, layer: int) -> str:
        return self.layer.format(layer)

    def mlp_name(self, layer: int) -> str:
        return self.mlp.format(layer)

    def proj_name(self, layer: int) -> str:
        return self.mlp_out_proj.format(layer)

    def weight_name(self, layer: int) -> str:
        """State-dict name of the edited weight of ``layer``."""
        return f"{self.proj_name(layer)}.weight"


def _llama_like(model_type: str) -> ModelSpec:
    return ModelSpec(
        model_type=model_type,
        layer="model.layers.{}",
        mlp="model.layers.{}.mlp",
        mlp_out_proj="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
    )


_SPECS: dict[str, ModelSpec] = {
    **{t: _llama_like(t) for t in ("llama", "qwen2", "qwen3", "mistral")},
    "gemma3_text": ModelSpec(
        model_type="gemma3_text",
        layer="model.layers.{}",
        # Gemma normalises the MLP output before adding it to the residual stream.
        mlp="model.layers.{}.post_feedforward_layernorm",
        mlp_out_proj="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
    ),
    "gpt2": ModelSpec(
        model_type="gpt2",
        layer="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out_proj="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        transposed=True,
    ),
    "gptj": ModelSpec(
        model_type="gptj",
        layer="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out_proj="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
}

KNOWN_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))


def spec_for_model_type(model_type: str) -> ModelSpec:
    """The spec for ``model_type``; unknown types name the known ones."""
    try:
        return _SPECS[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"no ModelSpec for model_type {model_type!r}; known: {', '.join(KNOWN_MODEL_TYPES)}"
        ) from None


def spec_for(model: nn.Module) -> ModelSpec:
    """The spec for a transformers model, from ``model.config.model_type``."""
    return spec_for_model_type(model.config.model_type)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing path."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise UnknownArchitectureError(f"module {name!r} not found in {type(model).__name__}") from err


def proj_weight(model: nn.Module, spec: ModelSpec, layer: int) -> nn.Parameter:
    """The edited parameter of ``layer`` as stored (possibly transposed)."""
    return get_module(model, spec.proj_name(layer)).weight


def to_storage_layout(delta_out_in: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Turn a (d_out, d_in) update into the parameter's own layout."""
    return delta_out_in.T.contiguous() if spec.transposed else delta_out_in
