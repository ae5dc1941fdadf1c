"""Fixtures of the proposal-method tests: the core's tiny verifiers."""

from __future__ import annotations

import sys
from pathlib import Path

from speculators_core.testing import one_torch_thread_fixture, tiny_verifier_fixtures

# --import-mode=importlib does not put test folders on sys.path: the tests import their shared
# helper (proposal_stats.py) from this folder.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# tiny_verifier (4-layer Llama, vocab 259), tiny_qwen3_verifier, verifier_model (the Llama).
tiny_verifier, tiny_qwen3_verifier, verifier_model = tiny_verifier_fixtures()
_one_torch_thread = one_torch_thread_fixture()
