"""Which precision path the value optimisation takes on this machine, decided at the edge.

``values.compute_dtype: auto`` becomes ``bfloat16`` where the hardware computes it natively
(a CUDA device, or a CPU with AMX-BF16 or AVX512-BF16) and ``float32`` elsewhere. The choice
is made here, once, and the resolved value travels in the settings, so every edit records the
path it took (manifest ``settings``, ledger ``compute_dtype``); a replay passes the recorded
path instead of resolving ``auto`` again on its own machine.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_facts() -> dict[str, object]:
    """CPU model name and its bf16 flags, read from /proc/cpuinfo (empty where absent)."""
    model, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model, "bf16_flags": [f for f in BF16_CPU_FLAGS if f in flags]}


def runtime(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """``(device, dtype)`` with ``auto`` resolved: cuda and bfloat16 where a GPU is present, cpu and
    float32 otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, dtype


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_facts()["bf16_flags"])


def resolve(settings, device: torch.device):
    """``settings`` (an editor's, with ``.values``) with ``compute_dtype`` ``auto`` resolved for ``device``."""
    if settings.values.compute_dtype != "auto":
        return settings
    chosen = "bfloat16" if native_bf16(device) else "float32"
    return dataclasses.replace(settings, values=dataclasses.replace(settings.values, compute_dtype=chosen))


def with_path(settings, compute_dtype: str, attention: str | None = None, tail_group_slack: int | None = None):
    """``settings`` forced onto a recorded v* path: ``compute_dtype`` (``float32`` or ``bfloat16``)
    and, when given, the attention kernel (``default`` or ``math``) and the tail-group slack."""
    values = dataclasses.replace(settings.values, compute_dtype=compute_dtype)
    if attention is not None:
        values = dataclasses.replace(values, attention=attention)
    if tail_group_slack is not None:
        values = dataclasses.replace(values, tail_group_slack=tail_group_slack)
    return dataclasses.replace(settings, values=values)


def recorded_path(record) -> tuple[str, str, int]:
    """(compute_dtype, attention, tail_group_slack) a ledger line or manifest values recorded; what
    a record made before each setting existed ran on: float32, the default kernel, one batch per width."""
    return (record.get("compute_dtype", "float32"), record.get("attention", "default"),
            int(record.get("tail_group_slack", 0)))


def describe_machine() -> str:
    """The CPU, its bf16 capability, its cores and torch's threads, for every benchmark's output."""
    facts = cpu_facts()
    flags = ", ".join(facts["bf16_flags"]) or "no native bf16"
    return f"cpu {facts['cpu']} ({flags}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def describe(settings) -> str:
    """One line for benchmarks and logs: the machine and the v* path taken."""
    return f"{describe_machine()}; v* compute dtype {settings.values.compute_dtype}"


__all__ = ["BF16_CPU_FLAGS", "cpu_facts", "describe", "describe_machine", "native_bf16", "recorded_path", "resolve",
           "with_path"]
