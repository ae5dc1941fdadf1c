"""Fixtures of the proposal-method tests: the core's tiny verifiers."""

from __future__ import annotations

import pytest

from speculators_core import PluginHost, PluginSettings
from speculators_core.testing import one_torch_thread_fixture, tiny_verifier_fixtures

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
