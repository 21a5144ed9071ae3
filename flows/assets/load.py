"""Load a model folder for editing: local files only, safetensors only, no remote code.

The model comes back in eval mode with gradients off.  The tokenizer always has a pad token
and pads on the **left**, so ``tok(batch, padding=True)`` keeps every prompt's last token at
position -1 (next-token scoring, batched ``generate``).  ``nas_core.prompts.pad_batch`` pads
by itself and does not depend on this setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flows.assets.errors import ModelFetchError
from flows.assets.progress import quiet_transformers


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32``, ``"float32"`` or ``"torch.float32"`` as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ModelFetchError(f"unknown dtype {dtype!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def weight_files(folder: Path) -> list[Path]:
    """The folder's ``*.safetensors`` files in name order."""
    return sorted(folder.glob("*.safetensors"))


def _pad_left(model: Any, tok: Any, path: Path) -> None:
    """Give the tokenizer a pad token (eos when it has none), left padding, and the model the same pad id."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelFetchError(f"tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a fetched (or any local Hugging Face) folder: ``(model, tokenizer)``.

    Local files only, safetensors only, no remote code.  The model is in eval mode with
    ``requires_grad_(False)``.  The tokenizer has a pad token (eos when it has none) and
    ``padding_side="left"``; the model's generation config gets the same pad token id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFetchError(f"{path} is not a model folder (no config.json); fetch it first with fetch_model()")
    if not weight_files(path) and not list(path.glob("*.safetensors.index.json")):
        raise ModelFetchError(f"{path} has no *.safetensors weights (only safetensors are loaded)")
    dtype = as_dtype(dtype)
    dev = torch.device(device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "local_files_only": True,
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if dev.type != "cpu":
        kwargs["device_map"] = str(dev)  # straight onto the accelerator, no host copy
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model.eval()
    model.requires_grad_(False)
    _pad_left(model, tok, path)
    return model, tok


__all__ = ("as_dtype", "dtype_name", "load_model", "weight_files")
