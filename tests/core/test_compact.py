"""Frozen copies stored narrower only when nothing changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from speculators_core.modeling import compact
from speculators_core.modeling.compact import compact_frozen


def _embedding(exact: bool, *, frozen: bool = True) -> nn.Embedding:
    torch.manual_seed(0)
    module = nn.Embedding(50, 12)
    with torch.no_grad():
        if exact:
            module.weight.copy_(module.weight.bfloat16().float())
    module.weight.requires_grad_(not frozen)
    return module


def test_exact_frozen_embedding_is_stored_in_bf16_and_reads_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every value a bf16 value: stored in bf16 (half the bytes), lookups give the same fp32."""
    monkeypatch.setattr(compact, "_BLOCK_ELEMENTS", 7 * 12)  # blocks of 7 rows
    module = _embedding(exact=True)
    ids = torch.tensor([[0, 3, 49, 3], [17, 1, 2, 48]])
    before = module(ids)
    assert compact_frozen(module) == 50 * 12 * 2
    assert module.weight.dtype == torch.bfloat16 and not module.weight.requires_grad
    assert torch.equal(module(ids).float(), before)


@pytest.mark.parametrize("case", ["inexact", "trains", "already-narrow"])
def test_left_alone_when_a_value_would_change_or_it_trains(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One value off the bf16 grid (in the last block), a trainable weight, or a bf16 one: 0."""
    monkeypatch.setattr(compact, "_BLOCK_ELEMENTS", 7 * 12)
    module = _embedding(exact=case != "trains", frozen=case != "trains")
    if case == "inexact":
        with torch.no_grad():
            module.weight[49, 5] += 1e-4  # not representable in bf16 next to its neighbours
    if case == "already-narrow":
        module.weight = nn.Parameter(module.weight.detach().bfloat16(), requires_grad=False)
    dtype = module.weight.dtype
    assert compact_frozen(module) == 0
    assert module.weight.dtype == dtype


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_page_out_drops_read_file_pages_and_keeps_the_values(tmp_path: Path) -> None:
    """A tensor mapped from a file (as checkpoints are loaded): its read pages leave the
    process's resident set, and reading it again gives the same values from the file."""
    count = 16 * 2**20  # 64 MiB of float32
    path = tmp_path / "tensor.bin"
    torch.arange(count, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=count, dtype=torch.float32)
    total = float(mapped.double().sum())  # reads every page
    before = _rss_file_mb()
    compact._page_out(mapped)
    after = _rss_file_mb()
    assert before - after > 48, (before, after)
    assert float(mapped.double().sum()) == total == count * (count - 1) / 2


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")
