"""GGUF to a plain safetensors folder: transformers dequantises, the model is rebuilt without quantizer.

``save_pretrained`` refuses GGUF-loaded models (they carry a GGUF quantizer), so the model is
rebuilt from its config without ``quantization_config`` and the dequantised state dict is
loaded into it; tied embeddings must match what the GGUF holds (a separate ``output.weight``
or not), and the saved folder must reload with the same logits (:func:`~flows.assets.convert.check_saved`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from flows.assets.convert import check_saved, probe_logits, save_model, tied
from flows.assets.errors import ModelFetchError
from flows.assets.load import dtype_name
from flows.assets.progress import Progress, quiet_transformers
from flows.assets.provenance import versions

log = logging.getLogger(__name__)


def _strip_quantization(cfg: Any) -> Any:
    cfg = copy.deepcopy(cfg)
    if getattr(cfg, "quantization_config", None) is not None or hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    return cfg


def _gguf_has_output_weight(gguf_path: Path) -> bool | None:
    try:
        from gguf import GGUFReader

        return any(t.name == "output.weight" for t in GGUFReader(str(gguf_path)).tensors)
    except Exception as exc:  # pragma: no cover - informational only
        log.debug("could not list GGUF tensors of %s: %s", gguf_path, exc)
        return None


def _load_gguf(gguf_path: Path, progress: Progress) -> tuple[Any, Any]:
    """Tokenizer and fp32 dequantised model of a local GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    common = {"gguf_file": fname, "local_files_only": True, "trust_remote_code": False}
    try:
        with progress.status("GGUF tokenizer"), quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, **common)
        # The dequantiser draws a plain tqdm bar that no public switch reaches: give it the terminal.
        with progress.paused(), quiet_transformers():
            src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **common)
    except Exception as exc:
        raise ModelFetchError(
            f"transformers {versions()['transformers_version']} could not load {fname} "
            f"as a causal LM: {type(exc).__name__}: {exc}"
        ) from exc
    return tok, src


def _rebuild_plain(src: Any, cfg: Any, gguf_path: Path, dtype: torch.dtype) -> tuple[Any, bool | None]:
    """A quantizer-free model of ``cfg`` in ``dtype`` holding ``src``'s weights; also whether the
    GGUF has a separate ``output.weight``."""
    from transformers import AutoModelForCausalLM

    has_output = _gguf_has_output_weight(gguf_path)
    tie = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False))
    if has_output is not None and tie == has_output:
        raise ModelFetchError(
            f"{gguf_path.name}: tie_word_embeddings={tie} but the GGUF "
            f"{'has' if has_output else 'lacks'} a separate output.weight"
        )
    dst = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    result = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (tie and k.startswith("lm_head"))]
    if missing or result.unexpected_keys:
        raise ModelFetchError(
            f"GGUF state dict does not fit the rebuilt {type(dst).__name__}: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if tie:
        dst.tie_weights()
        if not tied(dst):
            raise ModelFetchError("rebuilt model lost its tied lm_head/embed_tokens")
    dst.eval()
    return dst, has_output


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: torch.dtype, progress: Progress) -> dict[str, Any]:
    """Dequantise a GGUF with transformers and save it as a plain safetensors folder in ``dtype``."""
    tok, src = _load_gguf(gguf_path, progress)
    with progress.status(f"rebuild as plain {dtype_name(dtype)} model"), quiet_transformers():
        cfg = _strip_quantization(src.config)
        dst, has_output = _rebuild_plain(src, cfg, gguf_path, dtype)
        ref = probe_logits(src)
        del src
    huge = int(1e12)
    max_pos = getattr(cfg.get_text_config(), "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > huge):
        tok.model_max_length = int(max_pos)  # GGUF tokenizers come without a length limit
    with progress.status(f"save {dtype_name(dtype)} safetensors"), quiet_transformers():
        save_model(dst, tok, out_dir)
    info = check_saved(out_dir, ref, dtype, progress)
    info.update({"gguf_has_output_weight": has_output})
    return info


__all__ = ("convert_gguf",)
