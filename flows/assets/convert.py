"""Write a model as a plain safetensors folder in one dtype, and prove the folder reloads the same.

Every conversion (a local or hub Hugging Face folder here, a GGUF in :mod:`flows.assets.gguf`)
saves through :func:`save_model` and ends in :func:`check_saved`, which reloads the folder and
compares its logits on a fixed probe with the in-memory model's before anything is published.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from flows.assets.errors import ModelFetchError
from flows.assets.load import dtype_name, load_model
from flows.assets.progress import Progress, quiet_transformers


def _probe_ids(model: Any) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    return torch.arange(1, 9, dtype=torch.long).mul_(7919).remainder_(vocab).unsqueeze(0)


@torch.no_grad()
def probe_logits(model: Any) -> torch.Tensor:
    """fp32 logits of ``model`` on a fixed 8-token probe (the reference a saved folder must reproduce)."""
    return model(input_ids=_probe_ids(model), use_cache=False).logits.float()


def tied(model: Any) -> bool:
    """Whether the output embedding shares its storage with the input embedding."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def save_model(model: Any, tok: Any, out_dir: Path) -> None:
    """``save_pretrained`` model and tokenizer; refuses a folder that is not safetensors-only."""
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers < 5; v5 always writes safetensors
    model.save_pretrained(out_dir, **kwargs)
    tok.save_pretrained(out_dir)
    if not list(out_dir.glob("*.safetensors")) or list(out_dir.glob("*.bin")):
        raise ModelFetchError(f"save_pretrained did not write safetensors-only weights into {out_dir}")


def _model_info(model: Any, diff: float) -> dict[str, Any]:
    """What ``provenance.json`` records of the reloaded model."""
    text_cfg = model.config.get_text_config()
    return {
        "model_type": model.config.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or []),
        "num_hidden_layers": getattr(text_cfg, "num_hidden_layers", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "intermediate_size": getattr(text_cfg, "intermediate_size", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(text_cfg, "tie_word_embeddings", False)),
        "lm_head_tied_after_reload": tied(model),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "reload_max_abs_logit_diff": diff,
    }


def check_saved(out_dir: Path, ref: torch.Tensor, dtype: torch.dtype, progress: Progress) -> dict[str, Any]:
    """Reload the saved folder and compare logits with the in-memory model."""
    with progress.status("verify saved folder"):
        model, _ = load_model(out_dir, dtype=dtype)
        got = probe_logits(model)
        diff = float((got - ref).abs().max())
        tol = 1e-4 if dtype == torch.float32 else 5e-2 * float(ref.abs().max())
        if not torch.isfinite(got).all() or diff > tol:
            raise ModelFetchError(f"reloaded model disagrees with the converted one (max |dlogit| {diff:.3g})")
        return _model_info(model, diff)


def convert_hf_dir(src_dir: Path, out_dir: Path, *, dtype: torch.dtype, progress: Progress) -> dict[str, Any]:
    """Re-save a local Hugging Face folder in ``dtype`` as safetensors (no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"local_files_only": True, "trust_remote_code": False}
    with progress.status(f"load {src_dir.name}"), quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(src_dir, **common)
            model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=dtype, use_safetensors=True, **common)
        except Exception as exc:
            raise ModelFetchError(
                f"cannot load {src_dir} as a causal LM with transformers: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        ref = probe_logits(model)
    with progress.status(f"save {dtype_name(dtype)} safetensors"), quiet_transformers():
        save_model(model, tok, out_dir)
    del model
    return check_saved(out_dir, ref, dtype, progress)


__all__ = ("check_saved", "convert_hf_dir", "probe_logits", "save_model", "tied")
