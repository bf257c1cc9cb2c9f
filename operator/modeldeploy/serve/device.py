"""Device, precision and thread choices, checked at start-up: an unsupported combination is an error, never a
silent fallback."""

from __future__ import annotations

import math
import os
from pathlib import Path

QUANTIZATIONS = ("auto", "none", "fp16", "bf16", "int8-dynamic")


class StartupError(Exception):
    """The server cannot start with these settings; the message says why."""


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return requested


def resolve_quantization(quantization: str, device: str) -> str:
    """auto: fp16 on CUDA; on CPU it stays auto, decided at load by measuring int8 against fp32 (precision.py)."""
    import torch

    if quantization == "auto":
        return "fp16" if device == "cuda" else "auto"
    if quantization == "fp16" and device != "cuda":
        raise StartupError("fp16 needs a CUDA device; on CPU use none, bf16 or int8-dynamic")
    if quantization == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise StartupError("bf16 is not supported by this GPU; use fp16")
    if quantization == "int8-dynamic" and device != "cpu":
        raise StartupError("int8-dynamic is the CPU quantization; on CUDA use fp16 or bf16")
    return quantization


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the container may use, from its cgroup quota (v2 cpu.max, or v1 cfs quota/period)."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_threads(requested: int | None = None) -> int:
    """Threads for torch: as asked, else the container's CPU limit (rounded up), else the CPUs it may run on."""
    if requested:
        return requested
    available = len(os.sched_getaffinity(0))
    limit = cpu_limit()
    return max(1, min(available, math.ceil(limit))) if limit else available
