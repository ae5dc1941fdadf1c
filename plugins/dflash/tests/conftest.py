"""Fixtures of the DFlash plugin tests: the core's shared plugin-test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

from speculators_core.testing import one_torch_thread_fixture, tiny_verifier_fixtures

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path; the
# test modules import their shared helpers (dflash_helpers.py) from this folder.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# Tiny random verifiers, built once per session: tiny_verifier (4-layer Llama),
# tiny_qwen3_verifier (4-layer Qwen3, tied embeddings), verifier_model (the Llama, loaded).
tiny_verifier, tiny_qwen3_verifier, verifier_model = tiny_verifier_fixtures()
_one_torch_thread = one_torch_thread_fixture()
