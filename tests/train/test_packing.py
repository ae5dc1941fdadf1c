"""Packing samples into rows, collating rows into batches, and dealing rows to processes."""

from __future__ import annotations

import math
import random

import pytest
import torch
from train_samples import random_samples

from speculators_core.batch import BATCH_KEYS
from speculators_core.train import (
    DataError,
    FeatureShape,
    InMemorySource,
    Piece,
    RunPlan,
    collate_rows,
    pack_rows,
    split_indices,
)
from speculators_core.train.packing import pieces_of


def _covered_tokens(rows: list[list[Piece]]) -> dict[int, list[tuple[int, int]]]:
    spans: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        for p in row:
            spans.setdefault(p.sample, []).append((p.start, p.start + p.length))
    return {k: sorted(v) for k, v in spans.items()}


@pytest.mark.parametrize("overlong", ["split", "truncate", "drop"])
def test_pack_rows_fits_rows_and_covers_what_the_policy_keeps(overlong):
    """Rows never exceed seq_len and hold exactly the tokens the overlong policy keeps."""
    rng = random.Random(0)
    seq_len = 32
    lengths = [rng.randint(1, 80) for _ in range(60)]
    order = list(range(60))
    rng.shuffle(order)
    rows = pack_rows(order, [lengths[i] for i in order], seq_len, overlong)
    assert all(sum(p.length for p in row) <= seq_len for row in rows)
    assert all(row for row in rows)
    spans = _covered_tokens(rows)
    for i, n in enumerate(lengths):
        if n <= seq_len:
            expected = [(0, n)]
        elif overlong == "split":
            expected = [(s, min(s + seq_len, n)) for s in range(0, n, seq_len)]
        elif overlong == "truncate":
            expected = [(0, seq_len)]
        else:
            expected = []
        assert spans.get(i, []) == expected, (i, n)


def test_pack_rows_is_deterministic_and_fills_rows_well():
    """The same input gives the same plan; first-fit wastes little room on short samples."""
    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(200)]
    order = list(range(200))
    a = pack_rows(order, lengths, 128)
    b = pack_rows(order, lengths, 128)
    assert a == b
    used = sum(lengths) / (len(a) * 128)
    assert used > 0.9


def test_pieces_of_empty_sample():
    """A sample without tokens contributes nothing."""
    assert pieces_of(3, 0, 16, "split") == []


def test_collate_rows_matches_a_plain_rebuild():
    """Each row is the concatenation of its pieces, with restarting positions and document ids."""
    samples = random_samples(6, hidden=8, vocab=50, seed=2, min_len=3, max_len=20, num_states=2)
    source = InMemorySource(samples)
    seq_len = 24
    rows = [
        [Piece(0, 0, samples[0]["input_ids"].numel()), Piece(1, 2, 5)],
        [],
        [Piece(2, 0, 4), Piece(3, 1, 3), Piece(0, 1, 2)],
    ]
    batch = collate_rows(rows, source, seq_len, FeatureShape(2, 8, torch.float32))
    assert tuple(batch) == BATCH_KEYS
    for r, row in enumerate(rows):
        ids, mask, pos, doc, hs = [], [], [], [], []
        for d, p in enumerate(row):
            s = samples[p.sample]
            for t in range(p.start, p.start + p.length):
                ids.append(int(s["input_ids"][t]))
                mask.append(int(s["loss_mask"][t]))
                pos.append(t)
                doc.append(d)
                hs.append(s["hidden_states"][t])
        pad = seq_len - len(ids)
        assert batch["input_ids"][r].tolist() == ids + [0] * pad
        assert batch["loss_mask"][r].tolist() == mask + [0] * pad
        assert batch["position_ids"][r].tolist() == pos + [0] * pad
        assert batch["document_ids"][r].tolist() == doc + [-1] * pad
        if hs:
            assert torch.equal(batch["hidden_states"][r, : len(hs)], torch.stack(hs))
        assert not batch["hidden_states"][r, len(hs) :].any()


def test_collate_rows_uses_get_many_once_per_micro_batch():
    """A source with get_many is asked once for all samples of the micro-batch."""
    samples = random_samples(4, hidden=4, vocab=20, seed=3)

    class Batched(InMemorySource):
        def __init__(self, samples):
            super().__init__(samples)
            self.calls: list[list[int]] = []

        def __getitem__(self, index):
            raise AssertionError("get_many should be used")

        def get_many(self, indices):
            self.calls.append(list(indices))
            return [self.samples[i] for i in indices]

    source = Batched(samples)
    rows = [[Piece(2, 0, 3), Piece(0, 0, 2)], [Piece(2, 3, 1)]]
    collate_rows(rows, source, 8, FeatureShape(1, 4, torch.float32))
    assert source.calls == [[2, 0]]


def test_collate_rows_rejects_bad_samples():
    """Missing keys, inconsistent lengths and foreign hidden shapes are one-line DataErrors."""
    good = random_samples(1, hidden=4, vocab=20, seed=0, min_len=5, max_len=5)[0]
    feature = FeatureShape(1, 4, torch.float32)
    cases = [
        {"input_ids": good["input_ids"], "loss_mask": good["loss_mask"]},
        {**good, "loss_mask": good["loss_mask"][:3]},
        {**good, "hidden_states": torch.zeros(5, 1, 6)},
    ]
    for sample in cases:
        with pytest.raises(DataError) as err:
            collate_rows([[Piece(0, 0, 5)]], InMemorySource([sample]), 8, feature)
        assert "\n" not in str(err.value)


def test_split_indices_is_fixed_and_disjoint():
    """The validation split depends only on the seed, is disjoint and covers everything."""
    train, val = split_indices(100, 0.1, seed=5)
    assert (train, val) == split_indices(100, 0.1, seed=5)
    assert len(val) == 10 and set(train) | set(val) == set(range(100)) and not set(train) & set(val)
    assert split_indices(100, 0.1, seed=6)[1] != val
    assert split_indices(1, 0.5, seed=0) == ([0], [])
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_run_plan_deals_every_row_once_per_epoch(world):
    """Across processes and steps, every packed row of an epoch is trained exactly once."""
    rng = random.Random(world)
    lengths = [rng.randint(3, 40) for _ in range(50)]
    plan = RunPlan(
        lengths,
        list(range(50)),
        seq_len=48,
        micro_batch_rows=2,
        grad_accum_steps=3,
        world_size=world,
        seed=0,
    )
    for epoch in range(2):
        rows = plan.epoch_rows(epoch)
        seen: list[list[Piece]] = []
        tokens = 0
        for step in range(plan.steps_in_epoch(epoch)):
            per_rank = [plan.step_micro_batches(epoch, step, r) for r in range(world)]
            # Same number of micro-batches on every process, each of micro_batch_rows rows.
            assert len({len(m) for m in per_rank}) == 1
            assert all(len(mb) == 2 for m in per_rank for mb in m)
            for m in range(len(per_rank[0])):
                for r in range(world):
                    seen.extend(row for row in per_rank[r][m] if row)
            tokens += plan.step_tokens(epoch, step)
        assert seen == rows
        assert tokens == sum(lengths)
    assert plan.epoch_rows(0) != plan.epoch_rows(1)  # reshuffled each epoch
    micro_batches = math.ceil(len(plan.epoch_rows(0)) / (2 * world))
    expected_steps = math.ceil(micro_batches / 3)
    assert plan.steps_in_epoch(0) == expected_steps
