"""Fixtures of the proposal-method tests: the core's tiny verifiers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from speculators_core import PluginHost, PluginSettings
from speculators_core.testing import one_torch_thread_fixture, tiny_verifier_fixtures

# --import-mode=importlib does not put test folders on sys.path: the core's tests/ folder holds
# the shared test helpers (_support.fit_tiny_draft).
_CORE_TESTS = Path(__file__).resolve().parents[3] / "tests"
if str(_CORE_TESTS) not in sys.path:
    sys.path.insert(0, str(_CORE_TESTS))

# tiny_verifier (4-layer Llama, vocab 259), tiny_qwen3_verifier, verifier_model (the Llama).
tiny_verifier, tiny_qwen3_verifier, verifier_model = tiny_verifier_fixtures()
_one_torch_thread = one_torch_thread_fixture()


@pytest.fixture(scope="module")
def proposals_host() -> PluginHost:
    """A host with only the core, the EAGLE-3 plugin and this one (no other installed plugin)."""
    eagle3 = pytest.importorskip("speculators_eagle3.plugin")
    import speculators_proposals.plugin as proposals

    return PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[
            ("speculators.algorithms:eagle3", eagle3),
            ("speculators.plugins:proposals", proposals),
        ],
    )
