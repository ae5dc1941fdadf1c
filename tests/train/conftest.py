"""Fixtures of the training-engine tests: the fixture algorithm, tiny verifiers, real stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # train_samples and train_script live next to the tests
    sys.path.insert(0, str(HERE))

from train_samples import synthetic_chats  # noqa: E402


@pytest.fixture(scope="session")
def fixture_plugin():
    """The fixture algorithm's plugin module (``fixture-mlp``)."""
    from speculators_fixture_good import plugin

    return plugin


@pytest.fixture
def host(fixture_plugin):
    """An isolated plugin host: the core's built-ins plus the fixture algorithm."""
    from speculators_core.plugins import PluginHost, PluginSettings

    return PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[("speculators.algorithms:fixture-mlp", fixture_plugin)],
    )


@pytest.fixture(scope="session")
def small_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, vocab 256) with a chat template."""
    from speculators_core.testing import make_tiny_verifier

    return make_tiny_verifier(
        tmp_path_factory.mktemp("small-verifier"),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )


@pytest.fixture(scope="session")
def other_small_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes and tokenizer as ``small_verifier``, other random weights."""
    from speculators_core.testing import make_tiny_verifier

    return make_tiny_verifier(
        tmp_path_factory.mktemp("other-small-verifier"),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        seed=1,
    )


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory, small_verifier: Path) -> Path:
    """Prepared data (token ids + loss masks) of 24 synthetic chats, for ``small_verifier``."""
    from speculators_core.data.prepared import prepare_data

    root = tmp_path_factory.mktemp("prepared")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in synthetic_chats(24, seed=3)))
    out = root / "prepared"
    prepare_data(verifier=small_verifier, sources=[chats], output=out, seq_length=256)
    return out


@pytest.fixture(scope="session")
def store(
    tmp_path_factory: pytest.TempPathFactory, small_verifier: Path, prepared_data: Path
) -> Path:
    """A real hidden-state store of ``prepared_data`` with the fixture algorithm's spec."""
    from speculators_core.data.store import capture_to_store
    from speculators_core.features import HiddenStateSpec

    out = tmp_path_factory.mktemp("store") / "store"
    capture_to_store(
        verifier=small_verifier,
        prepared=prepared_data,
        output=out,
        spec=HiddenStateSpec(layer_ids=(2,)),
        dtype="float32",
        shard_size=8,
    )
    return out
