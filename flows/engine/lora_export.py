"""A checkpoint as a PEFT LoRA adapter of the edited projections (``nas export --format peft``).

A serving stack that hot-loads LoRA adapters takes a night's edits this way without reloading
the base model. The adapter's factors are the lineage's own (every version's increment, base
first: :func:`flows.engine.chain.lineage_steps`), exact while the rank stays below
min(d_out, d_in); otherwise, or when a version of the lineage kept no factors (format 1), the
truncated SVD of D with its relative error. ``lora_alpha`` equals the rank per module, so the
scaling is 1 and ``B @ A`` is the update itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flows.engine.chain import lineage_steps
from flows.engine.checkpoints import read_checkpoint, staged_dir
from nas_core import lora

ADAPTER = "adapter_model.safetensors"
REPORT = "nas_export.json"


def _factors(name: str, dense: torch.Tensor, steps, transposed: bool, max_rank: int | None) -> lora.LoraFactors:
    """LoRA factors of weight ``name`` from the lineage's pairs (or D's SVD when ``steps`` is None);
    ``dense`` is D in the parameter's storage layout, (d_in, d_out) when ``transposed``."""
    out_in = dense.T if transposed else dense
    if steps is None:
        return lora.from_dense(out_in, min(out_in.shape) if max_rank is None else max_rank)
    pairs = [pair for step in steps if name in step.factors for pair in step.factors[name].pairs]
    return lora.from_pairs(pairs, out_in, max_rank)


def export_peft(checkpoint: Path, out: Path, base_model: str, transposed_weights: bool,
                max_rank: int | None = None) -> dict[str, Any]:
    """Write ``out`` (adapter_config.json, adapter_model.safetensors, nas_export.json) for the
    verified ``checkpoint``; returns the report (rank, exactness and error per module, bytes).

    ``base_model``: what the adapter's config names as its base (a local folder or hub id);
    ``transposed_weights``: the model stores its projections (d_in, d_out) (GPT-2's Conv1D).
    """
    from peft import LoraConfig

    ckpt = read_checkpoint(checkpoint)
    steps = lineage_steps(checkpoint)
    tensors, modules = {}, {}
    for name in ckpt.manifest["edited_weights"]:
        dense = ckpt.deltas.get(name)
        if dense is None:
            continue
        f = _factors(name, dense, steps, transposed_weights, max_rank)
        if f.rank == 0:
            continue
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = f.a
        tensors[f"base_model.model.{module}.lora_B.weight"] = f.b.contiguous()
        modules[module] = {"rank": f.rank, "exact": f.exact, "relative_error": f.relative_error}
    if not modules:
        raise ValueError(f"checkpoint {checkpoint} edits nothing: there is no adapter to write")
    ranks = {m: v["rank"] for m, v in modules.items()}
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(modules),
                        rank_pattern=ranks, alpha_pattern=ranks, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=transposed_weights, task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    with staged_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, tmp / ADAPTER, metadata={"format": "pt"})
        report = {"checkpoint": str(checkpoint), "weights_hash": ckpt.manifest["weights_hash"],
                  "edit_count": ckpt.manifest.get("edit_count"), "source": "factors" if steps is not None else "svd",
                  "modules": modules, "adapter_bytes": (tmp / ADAPTER).stat().st_size}
        (tmp / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


__all__ = ["ADAPTER", "REPORT", "export_peft"]
