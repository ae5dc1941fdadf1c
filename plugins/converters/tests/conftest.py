"""Fixtures of the converter tests: a tiny verifier vLLM-compatible in head size (built once)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from speculators_core.testing import make_tiny_verifier

# --import-mode=importlib does not put test folders on sys.path: add this folder (for
# converter_helpers.py) and the core's tests/ folder (for _support.run_cli).
for folder in (Path(__file__).parent, Path(__file__).parents[3] / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture(scope="session")
def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer random Llama verifier (default aux ids [2, 4, 5]): hidden 64, 2 heads of 32 (1 KV head), vocab ~259."""
    return make_tiny_verifier(
        tmp_path_factory.mktemp("verifier") / "llama", num_layers=8, num_heads=2, num_kv_heads=1
    )


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny-model tests on one torch thread (the slow vLLM ones keep all threads)."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
