"""Fixtures of the EAGLE-3 plugin tests: tiny random verifiers (built once per session)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from speculators_core.testing import make_tiny_verifier

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path; the
# test modules import their shared helpers (eagle3_helpers.py) from this folder.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama verifier (hidden 64, vocab 259) with a real tokenizer."""
    return make_tiny_verifier(tmp_path_factory.mktemp("verifier") / "llama", num_layers=4)


@pytest.fixture(scope="session")
def tiny_qwen3_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Qwen3 verifier (hidden 32) with tied embeddings."""
    return make_tiny_verifier(
        tmp_path_factory.mktemp("verifier") / "qwen3",
        model_type="qwen3",
        num_layers=4,
        hidden_size=32,
        tie_word_embeddings=True,
        seed=3,
    )


@pytest.fixture(scope="session")
def verifier_model(tiny_verifier: Path) -> Any:
    """The tiny Llama verifier, loaded with plain transformers."""
    return AutoModelForCausalLM.from_pretrained(tiny_verifier).eval()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run this folder's tests on one torch thread.

    The models here are tiny: with two threads on a shared two-core machine, thread hand-off
    costs more than the matrix products (measured 15x slower under load).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
