"""Helpers shared by the core's tests (importable as ``_support``; conftest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    args: list[str],
    *,
    site: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m speculators_core ARGS`` in a subprocess with optional installed fixtures."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    full_env["PYTHONPATH"] = str(site) if site else ""
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "speculators_core", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


def run_python(
    code: str, *, site: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a subprocess with optional installed fixtures."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    full_env["PYTHONPATH"] = str(site) if site else ""
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )
