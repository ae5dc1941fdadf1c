"""The split TTT attention kernel (CPU) and TTTMask, against per-query plain softmax loops."""

from __future__ import annotations

import pytest
import torch
from speculators_eagle3.attention import TTTMask, ttt_attention_mask
from speculators_eagle3.split_attention import split_attention, split_attention_applies

from speculators_core.modeling import attend

# Row 0: documents of 3, 1 (alone) and 4 positions, -1 gaps and padding; row 1: one document.
DOCS = torch.tensor(
    [
        [0, 0, 0, -1, 1, -1, 2, 2, 2, 2, -1, -1],
        [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, -1],
    ]
)


def visible_keys(
    docs: torch.Tensor, b: int, t: int, step: int, queries: torch.Tensor | None = None, j: int = 0
) -> list[int]:
    """FORMAT.md 3.3 for one query at position ``t``: its document's keys ``<= t`` in block 0 (or
    only its own), and its own key in every later block. With ``queries`` (``[B, Tq]``
    positions of compacted steps, -1 = padding) it is query ``j`` of row ``b``: later blocks hold
    ``Tq`` keys, one per query, and a padding query sees key 0 of block 0 alone."""
    length = docs.shape[1]
    if queries is None:
        later = [block * length + t for block in range(1, step + 1)]
    else:
        t = int(queries[b, j])
        later = [length + (block - 1) * queries.shape[1] + j for block in range(1, step + 1)]
    if t < 0:
        return [0, *later]
    seen = [
        k
        for k in range(length)
        if k == t or (int(docs[b, t]) >= 0 and k <= t and int(docs[b, k]) == int(docs[b, t]))
    ]
    return seen + later


def plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    docs: torch.Tensor,
    scale: float,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over each query's visible keys, one query and head at a time: ``[B, Tq, H, d]``."""
    batch, heads, num_queries, _ = query.shape
    group = heads // key.shape[1]
    step = (key.shape[2] - docs.shape[1]) // num_queries
    rows = []
    for b in range(batch):
        positions = []
        for j in range(num_queries):
            seen = visible_keys(docs, b, j, step, queries, j)
            per_head = []
            for h in range(heads):
                keys, values = key[b, h // group, seen], value[b, h // group, seen]
                probs = torch.softmax(keys @ query[b, h, j] * scale, dim=0)
                per_head.append(probs @ values)
            positions.append(torch.stack(per_head))
        rows.append(torch.stack(positions))
    return torch.stack(rows)


def random_inputs(
    step: int, dtype: torch.dtype, seed: int, num_queries: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query ``[B, 6, Tq, 8]`` laid out as the draft makes it (a transposed view), GQA keys/values
    of block 0 (``T``) and ``step`` later blocks (``Tq`` each)."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = DOCS.shape
    num_queries = length if num_queries is None else num_queries
    keys = length + step * num_queries
    query = torch.randn(batch, num_queries, 6, 8, generator=generator, dtype=dtype).transpose(1, 2)
    key = torch.randn(batch, 2, keys, 8, generator=generator, dtype=dtype)
    value = torch.randn(batch, 2, keys, 8, generator=generator, dtype=dtype)
    return query.requires_grad_(), key.requires_grad_(), value.requires_grad_()


def assert_same_attention(
    got: torch.Tensor,
    expected: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    tolerance: dict[str, float],
) -> None:
    """Same output, and the same query/key/value gradients for a random output gradient."""
    torch.testing.assert_close(got, expected, **tolerance)
    generator = torch.Generator().manual_seed(9)
    grad_out = torch.randn(got.shape, generator=generator).to(got.dtype)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out, retain_graph=True)
    for name, a, b in zip(("query", "key", "value"), got_grads, expected_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tolerance, msg=name)


EXACT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("step", [0, 1, 3])
def test_split_kernel_output_and_gradients_match_plain_softmax(step: int) -> None:
    """Output and query/key/value gradients equal the per-query softmax loop (float64)."""
    inputs = random_inputs(step, torch.float64, seed=step)
    mask = TTTMask(DOCS)
    assert split_attention_applies(inputs[0], inputs[1], mask)
    got = split_attention(*inputs, mask, scale=0.4).transpose(1, 2)
    assert_same_attention(got, plain_attention(*inputs, DOCS, 0.4), inputs, EXACT)


# Compacted queries: row 0 keeps positions 1, 2 (document 0, after its first position), 6, 8, 9
# (document 2: two spans, one with a prefix) and 5 (alone); row 1 keeps 3..9 and pads.
QUERIES = torch.tensor([[1, 2, 5, 6, 8, 9, -1], [3, 4, 5, 6, 7, 8, 9]])


@pytest.mark.parametrize("step", [0, 1, 2])
def test_split_kernel_on_compacted_steps_matches_plain_softmax(step: int) -> None:
    """Queries at chosen positions (prefix spans, alone and padding queries): exact, float64."""
    inputs = random_inputs(step, torch.float64, seed=10 + step, num_queries=QUERIES.shape[1])
    mask = TTTMask(DOCS).compacted(QUERIES)
    assert split_attention_applies(inputs[0], inputs[1], mask)
    spans = mask.block_zero_spans()
    assert spans is not None and any(first > start for *_, start, first in spans.spans)
    got = split_attention(*inputs, mask, scale=0.4).transpose(1, 2)
    expected = plain_attention(*inputs, DOCS, 0.4, QUERIES)
    assert_same_attention(got, expected, inputs, EXACT)
    dense = attend(*inputs, mask.dense(step), implementation="sdpa", scale=0.4)
    assert_same_attention(dense, expected, inputs, EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_with_ttt_mask_matches_dense_sdpa(dtype: torch.dtype) -> None:
    """``attend`` with a TTTMask (the split kernel) agrees with SDPA over the dense mask."""
    step = 2
    inputs = random_inputs(step, dtype, seed=5)
    split = attend(*inputs, TTTMask(DOCS), implementation="sdpa", scale=0.3)
    dense = attend(*inputs, ttt_attention_mask(DOCS, step), implementation="sdpa", scale=0.3)
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    )
    assert_same_attention(split, dense, inputs, tolerance)


def test_split_document_falls_back_to_the_dense_mask() -> None:
    """A document in two separate runs is no run: ``attend`` uses the dense mask, still exact."""
    docs = torch.tensor([[0, 0, 1, 1, 0, 0, -1]])
    mask = TTTMask(docs)
    assert mask.block_zero_spans() is None
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 7, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(1, 2, 14, 8, generator=generator, dtype=torch.float64)
    value = torch.randn(1, 2, 14, 8, generator=generator, dtype=torch.float64)
    assert not split_attention_applies(query, key, mask)
    got = attend(query, key, value, mask, implementation="sdpa", scale=0.5)
    torch.testing.assert_close(got, plain_attention(query, key, value, docs, 0.5))


@pytest.mark.parametrize("step", [0, 1, 2])
def test_ttt_mask_dense_is_the_plain_loop_mask(step: int) -> None:
    """``dense(step)`` is ttt_attention_mask's; compacted, it is the plain loop's visible keys."""
    mask = TTTMask(DOCS)
    assert torch.equal(mask.dense(step), ttt_attention_mask(DOCS, step))
    compacted = mask.compacted(QUERIES).dense(step)
    batch, num_queries = QUERIES.shape
    assert compacted.shape == (batch, 1, num_queries, DOCS.shape[1] + step * num_queries)
    for b in range(batch):
        for j in range(num_queries):
            seen = visible_keys(DOCS, b, j, step, QUERIES, j)
            assert compacted[b, 0, j].nonzero()[:, 0].tolist() == seen


def test_block_zero_spans_of_the_full_layout_are_the_documents() -> None:
    """Uncompacted, the spans are the documents (no prefix); -1 and one-position ones are alone."""
    spans = TTTMask(DOCS).block_zero_spans()
    assert spans is not None
    expected_spans, expected_alone = [], torch.zeros(DOCS.shape, dtype=torch.bool)
    for b, row in enumerate(DOCS.tolist()):
        for doc in sorted(set(row) - {-1}):
            where = [t for t, d in enumerate(row) if d == doc]
            if len(where) > 1:
                expected_spans.append((b, where[0], where[-1] + 1, where[0], where[0]))
            else:
                expected_alone[b, where[0]] = True
        for t, d in enumerate(row):
            if d < 0:
                expected_alone[b, t] = True
    assert sorted(spans.spans) == sorted(expected_spans)
    assert torch.equal(spans.alone, expected_alone)
    assert spans.has_alone and spans.alone_key is None  # alone queries see their own index


def test_attend_refuses_keys_that_are_not_whole_steps() -> None:
    """A TTTMask with a key length that is no whole number of steps is a one-line error."""
    from speculators_core import SpeculatorsError

    query = torch.randn(1, 2, 4, 8)
    key = torch.randn(1, 2, 6, 8)
    mask = TTTMask(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(SpeculatorsError, match="got 6 keys for 4 queries") as err:
        attend(query, key, key, mask, implementation="eager", scale=1.0)
    assert "\n" not in str(err.value)
