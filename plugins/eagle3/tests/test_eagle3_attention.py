"""TTT attention masks, kernel selection and kernels of the EAGLE-3 draft."""

from __future__ import annotations

import warnings

import pytest
import torch
from speculators_eagle3.attention import ttt_attention_mask, ttt_block_mask, ttt_mask_mod

from speculators_core import SpeculatorsError
from speculators_core.modeling import KVCache, attend, select_attention_implementation

DOCS = torch.tensor(
    [
        [0, 0, 0, 1, 1, -1, -1],
        [0, 0, 0, 0, 0, 0, -1],
    ]
)


def plain_loop_mask(docs: torch.Tensor, step: int) -> torch.Tensor:
    """FORMAT.md 3.3 written out: query t sees step-0 keys j <= t of its document, plus its own
    key in every later step; a query outside any document sees only its own keys."""
    batch, length = docs.shape
    mask = torch.zeros(batch, 1, length, (step + 1) * length, dtype=torch.bool)
    for b in range(batch):
        for t in range(length):
            for block in range(step + 1):
                for j in range(length):
                    if block == 0:
                        visible = j == t or (
                            docs[b, t] >= 0 and j <= t and docs[b, j] == docs[b, t]
                        )
                    else:
                        visible = j == t
                    mask[b, 0, t, block * length + j] = visible
    return mask


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_dense_mask_matches_plain_loop(step: int) -> None:
    """The dense TTT mask equals the plain-loop derivation at every step."""
    assert torch.equal(ttt_attention_mask(DOCS, step), plain_loop_mask(DOCS, step))


def test_dense_mask_documented_example() -> None:
    """FORMAT.md 3.3's example (lengths [3, 2], T = 6) at step 0 and step 2."""
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    step0 = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    eye = torch.eye(6, dtype=torch.bool)
    assert torch.equal(ttt_attention_mask(docs, 0)[0, 0], step0)
    assert torch.equal(ttt_attention_mask(docs, 2)[0, 0], torch.cat([step0, eye, eye], dim=1))


@pytest.mark.parametrize("step", [0, 2])
def test_flex_mask_mod_matches_plain_loop(step: int) -> None:
    """The flex ``mask_mod`` evaluated densely gives the same mask."""
    from torch.nn.attention.flex_attention import create_mask

    batch, length = DOCS.shape
    dense = create_mask(ttt_mask_mod(DOCS), batch, None, length, (step + 1) * length, "cpu")
    assert torch.equal(dense, plain_loop_mask(DOCS, step))


def test_flex_block_mask_attention_equals_sdpa() -> None:
    """Flex attention with the block mask computes the same output as SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    step, (batch, length) = 2, DOCS.shape
    query = torch.randn(batch, 4, length, 8)
    key = torch.randn(batch, 2, (step + 1) * length, 8)
    value = torch.randn(batch, 2, (step + 1) * length, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex warns that it is slow
        flex = flex_attention(
            query, key, value, block_mask=ttt_block_mask(DOCS, step), enable_gqa=True
        )
    dense = attend(
        query, key, value, ttt_attention_mask(DOCS, step), implementation="sdpa", scale=8**-0.5
    )
    torch.testing.assert_close(flex.transpose(1, 2), dense, rtol=1e-5, atol=1e-5)


def test_sdpa_and_eager_kernels_agree() -> None:
    """The SDPA and eager kernels give the same masked GQA attention."""
    torch.manual_seed(1)
    mask = ttt_attention_mask(DOCS, 1)
    batch, length = DOCS.shape
    query = torch.randn(batch, 4, length, 8)
    key = torch.randn(batch, 2, 2 * length, 8)
    value = torch.randn(batch, 2, 2 * length, 8)
    sdpa = attend(query, key, value, mask, implementation="sdpa", scale=0.3)
    eager = attend(query, key, value, mask, implementation="eager", scale=0.3)
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-6)
    # Plain loop for one query: softmax over visible keys, kv head = query head // 2.
    b, h, t = 0, 3, 4
    visible = mask[b, 0, t]
    scores = (key[b, h // 2, visible] @ query[b, h, t]) * 0.3
    expected = torch.softmax(scores, dim=0) @ value[b, h // 2, visible]
    torch.testing.assert_close(sdpa[b, t, h], expected, rtol=1e-5, atol=1e-6)


def test_auto_selects_flex_only_on_cuda() -> None:
    """``auto`` is flex on a CUDA device and SDPA on the CPU."""
    assert select_attention_implementation("auto", torch.device("cpu")) == "sdpa"
    assert select_attention_implementation("auto", "cpu") == "sdpa"
    assert select_attention_implementation("auto", torch.device("cuda", 0)) == "flex"
    assert select_attention_implementation("auto", "meta") == "sdpa"


def test_explicit_choices_and_errors() -> None:
    """Explicit kernels pass through; flex off CUDA and unknown names are one-line errors."""
    assert select_attention_implementation("eager", "cpu") == "eager"
    assert select_attention_implementation("sdpa", "cuda") == "sdpa"
    assert select_attention_implementation("flex", "cuda") == "flex"
    with pytest.raises(SpeculatorsError, match="needs a CUDA device") as err:
        select_attention_implementation("flex", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(SpeculatorsError, match="unknown attention implementation 'flash'"):
        select_attention_implementation("flash", "cpu")


def test_kv_cache_update_and_truncate() -> None:
    """The cache concatenates per layer and truncates every layer."""
    cache = KVCache(2)
    a, b = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4)
    cache.update(0, a, a + 1)
    keys, values = cache.update(0, b, b + 1)
    assert torch.equal(keys, torch.cat([a, b], dim=2))
    assert torch.equal(values, torch.cat([a, b], dim=2) + 1)
    cache.update(1, a, a)
    assert cache.length == 5
    cache.truncate(3)
    assert cache.length == 3
    assert cache.keys[1] is not None and cache.keys[1].shape[2] == 3
