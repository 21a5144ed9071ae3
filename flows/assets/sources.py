"""What a model source spec names, and which folder under the models root it maps to.

A spec is an ``hf:ORG/NAME[@REV]`` hub id, a known name (:mod:`flows.assets.registry`), or
a path to a local Hugging Face folder or ``.gguf`` file.  Nothing here downloads or writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flows.assets.errors import ModelFetchError
from flows.assets.registry import is_known, known_names

DEFAULT_MODELS_ROOT = Path("data/models")

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


def _unknown(spec: object) -> ModelFetchError:
    return ModelFetchError(
        f"unknown model source {str(spec)!r}: known names are {', '.join(known_names())}; "
        "otherwise pass hf:ORG/NAME[@REV] (Hugging Face hub), a local Hugging Face model "
        "folder, or a local .gguf file"
    )


def _parse_hf(spec: str) -> SourceSpec:
    body = spec[len("hf:") :]
    repo, sep, rev = body.partition("@")
    if not _HF_REPO.match(repo) or "--" in repo or ".." in repo or (sep and not rev.strip()):
        raise ModelFetchError(f"invalid Hugging Face id {spec!r}: expected hf:ORG/NAME[@REV]")
    slug = "hf--" + "--".join(sanitize_name(p) for p in repo.split("/"))
    if sep:
        slug += "@" + sanitize_name(rev)
    return SourceSpec("hf", repo, slug, rev if sep else None)


def _parse_path(p: Path) -> SourceSpec | None:
    """A local Hugging Face folder or ``.gguf`` file; ``None`` when nothing is at ``p``."""
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
    return None


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
        if is_known(spec):
            return SourceSpec("registry", spec, spec)
    local = _parse_path(Path(spec).expanduser())
    if local is not None:
        return local
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
    :func:`~flows.assets.fetch.fetch_model` converts it (``models_root/local--STEM``); finally
    a bare name of a folder already under ``models_root`` (e.g. ``local--tiny``) is accepted.
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


__all__ = ("DEFAULT_MODELS_ROOT", "SourceKind", "SourceSpec", "parse_source", "resolve_model_dir", "sanitize_name")
