"""Draft-vocabulary mapping (d2t offsets, t2d membership) against a plain-loop derivation."""

from __future__ import annotations

import random

import pytest
import torch

from speculators_core import build_vocab_mapping, check_vocab_mapping, draft_to_target


def _reference(counts: dict[int, int], vd: int, v: int) -> tuple[list[int], list[bool]]:
    """FORMAT.md 5.3 step by step, with plain Python lists."""
    items = [(c, i) for i, c in counts.items() if c > 0]
    items.sort(key=lambda ci: (-ci[0], ci[1]))
    chosen = [i for _, i in items[:vd]]
    candidate = 0
    while len(chosen) < vd:
        if candidate not in chosen:
            chosen.append(candidate)
        candidate += 1
    chosen.sort()
    d2t = [chosen[k] - k for k in range(vd)]
    t2d = [j in chosen for j in range(v)]
    return d2t, t2d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapping_matches_plain_loop(seed):
    rng = random.Random(seed)
    v, vd = 200, 50
    counts = {rng.randrange(v): rng.randrange(1, 20) for _ in range(120)}
    d2t, t2d = build_vocab_mapping(counts, vd, v)
    ref_d2t, ref_t2d = _reference(counts, vd, v)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert d2t.tolist() == ref_d2t and t2d.tolist() == ref_t2d
    check_vocab_mapping(d2t, t2d)
    # Every draft id maps to a chosen verifier id.
    assert t2d[draft_to_target(torch.arange(vd), d2t)].all()


def test_format_example_every_third_token():
    """FORMAT.md 1.4: tokens {0, 3, 6, ...} selected gives d2t[:5] = [0, 2, 4, 6, 8]."""
    counts = {i: 100 for i in range(0, 300, 3)}
    d2t, t2d = build_vocab_mapping(counts, 100, 300)
    assert d2t[:5].tolist() == [0, 2, 4, 6, 8]
    assert int(t2d.sum()) == 100


def test_too_few_tokens_fills_with_smallest_unseen_ids():
    d2t, t2d = build_vocab_mapping({10: 5, 3: 2}, 4, 20)
    assert (torch.arange(4) + d2t).tolist() == [0, 1, 3, 10]
    assert t2d.nonzero().flatten().tolist() == [0, 1, 3, 10]


def test_counts_as_tensor_equal_counts_as_mapping():
    counts = torch.tensor([0, 5, 1, 7, 0, 2])
    a = build_vocab_mapping(counts, 3, 6)
    b = build_vocab_mapping({1: 5, 2: 1, 3: 7, 5: 2}, 3, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="draft vocab size 30 must be between 1 and"):
        build_vocab_mapping({1: 1}, 30, 20)
    with pytest.raises(ValueError, match="outside the verifier vocab"):
        build_vocab_mapping({25: 1}, 2, 20)
    with pytest.raises(ValueError, match="int64"):
        check_vocab_mapping(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="t2d does not mark"):
        check_vocab_mapping(torch.tensor([0, 0]), torch.tensor([True, False, True]))
