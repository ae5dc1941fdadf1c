"""Shared fixtures of the data-pipeline tests: tiny verifiers, the real SmolLM2, chat files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from speculators_core.testing import make_tiny_verifier

# Test modules import shared records from datatest_support.py, whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from datatest_support import CHATS, write_jsonl


@pytest.fixture(scope="session")
def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML template (4 layers, hidden 64)."""
    return make_tiny_verifier(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes and tokenizer as ``tiny_verifier``, other random weights."""
    return make_tiny_verifier(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder (materialised once into the user cache)."""
    from speculators_core.assets import smollm2_path

    return smollm2_path()


@pytest.fixture()
def chat_file(tmp_path: Path) -> Path:
    """A JSONL file with the four chats of :data:`CHATS`."""
    return write_jsonl(tmp_path / "chats.jsonl", CHATS)
