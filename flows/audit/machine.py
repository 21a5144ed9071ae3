"""Machine facts: what decides whether two runs of the same edit are bit-identical.

Recorded at promotion (the ledger line, ``promotion.json``) and at replay (``replay.json``);
the audit lists the differences next to a mismatch.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

#: Machine facts that can change the last bits of an edit (compared by :func:`audit`).
BIT_KEYS = ("torch", "transformers", "cpu_capability", "cpu_model", "arch", "blas", "lapack", "mkl", "openmp",
            "threads", "device", "dtype", "env")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_config() -> dict[str, str]:
    """BLAS / LAPACK / MKL / OpenMP facts of ``torch.__config__.show()``."""
    import torch

    out: dict[str, str] = {}
    text = torch.__config__.show()
    for key, pattern in (("blas", r"\bBLAS_INFO=([^,\s]+)"), ("lapack", r"\bLAPACK_INFO=([^,\s]+)")):
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1)
    for line in text.splitlines():
        line = line.strip().lstrip("- ").strip()
        if "Math Kernel Library" in line:
            out["mkl"] = line
        elif line.startswith("OpenMP"):
            out["openmp"] = line
    return out


#: Environment variables that change threads or kernel choice (MKL_CBWR pins MKL's code path).
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
            "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")


def machine_info(model: Any = None) -> dict[str, Any]:
    """What decides whether two runs of the same edit are bit-identical, as JSON-able facts.

    ``model``: where given, its device and dtype (the product edits fp32 on CPU).
    """
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of the project
        tf_version = None
    device, dtype = "cpu", "float32"
    if model is not None:
        p = next(model.parameters())
        device, dtype = str(p.device), str(p.dtype).removeprefix("torch.")
    cfg = _torch_config()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas": cfg.get("blas", "unknown"),
        "lapack": cfg.get("lapack", "unknown"),
        "mkl": cfg.get("mkl", "none") if torch.backends.mkl.is_available() else "none",
        "openmp": cfg.get("openmp", "unknown"),
        "device": device,
        "dtype": dtype,
        "cuda": torch.version.cuda,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """``key: (a, b)`` for each :data:`BIT_KEYS` fact that differs (nothing when either is unknown)."""
    if not a or not b:
        return {}
    return {k: (a.get(k), b.get(k)) for k in BIT_KEYS if a.get(k) != b.get(k)}
