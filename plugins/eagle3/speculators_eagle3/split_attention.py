"""Exact TTT attention on the CPU without the dense mask: flash attention per document span,
plus the keys each query sees alone.

At TTT step ``s`` a query at position ``t`` attends (FORMAT.md 3.3) to the block-0 keys
``j <= t`` of its document and to one key in each later block: its own. With SDPA and the dense
mask, torch's CPU flash kernel scores every query against every key (a mask does not let it
skip anything): ``s + 1`` times the work of block 0, and block 0 itself is mostly masked out in
a packed row. This kernel computes the same softmax in pieces (see
:class:`~speculators_eagle3.attention.BlockZeroSpans`):

* block 0, per span of consecutive query positions ``first..`` of a document starting at
  ``a``: torch's CPU flash attention over the keys ``first..`` with ``is_causal`` (which skips
  the upper triangle), and over the prefix keys ``a..first-1`` without a mask (only when the
  queries are a subset of the positions); each gives an output ``o_k`` and the log-sum-exp
  ``m_k`` of its scores. A query alone in block 0 (no document, or a document of one position)
  gets its one key's score and value;
* blocks ``1..s``: the diagonal score ``d_i = scale * q . k_i`` and value ``v_i``;
* the union: ``m = logsumexp_k(m_k)`` over all pieces, output ``sum_k exp(m_k - m) o_k``.

The backward pass is flash attention's: the flash backward kernel, given the *combined* output
and log-sum-exp, returns each piece's exact gradients (it recomputes each probability as
``exp(score - m)`` and uses ``rowsum(dO * out)``), and the single keys get
``dS = w (dO . v - rowsum(dO * out))``, the same formula written out.

Only the CPU kernel of torch (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward, the ops SDPA dispatches to on the CPU) is used; :func:`split_attention_applies` says
when it is there and the batch's documents are contiguous runs (otherwise ``attend`` uses the
dense mask).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from speculators_eagle3.attention import BlockZeroSpans, TTTMask

__all__ = ["split_attention", "split_attention_applies"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@functools.cache
def _flash_ops() -> tuple[Any, Any] | None:
    """torch's CPU flash attention forward and backward ops, or None in a torch without them."""
    aten = torch.ops.aten
    try:
        return (
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        )
    except (AttributeError, RuntimeError):
        return None


def split_attention_applies(query: torch.Tensor, key: torch.Tensor, mask: TTTMask) -> bool:
    """Whether :func:`split_attention` can compute this TTT attention."""
    return (
        query.device.type == "cpu"
        and query.dtype in _DTYPES
        and key.dtype == query.dtype
        and query.shape[2] > 0
        and query.shape[1] % key.shape[1] == 0
        and _flash_ops() is not None
        and mask.block_zero_spans() is not None
    )


def split_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: TTTMask, *, scale: float
) -> torch.Tensor:
    """TTT attention of ``query`` ``[B, heads, Tq, d]`` over the cached ``key``/``value``
    ``[B, kv_heads, T + s * Tq, d]`` of steps ``0..s``: ``[B, heads, Tq, d]``.

    The same result (up to float rounding) as SDPA with ``mask.dense(s)``; needs
    :func:`split_attention_applies`.
    """
    spans = mask.block_zero_spans()
    if spans is None:  # pragma: no cover - attend checks split_attention_applies first
        raise ValueError("split_attention needs documents that are contiguous runs")
    block_length = mask.num_keys_per_step[0]
    out: torch.Tensor = _SplitAttention.apply(query, key, value, spans, block_length, scale)
    return out


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, heads, ...] -> [B, kv_heads, heads // kv_heads, ...]`` (a view)."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def _single_keys(
    key: torch.Tensor, value: torch.Tensor, spans: BlockZeroSpans, block_length: int, acc: Any
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The keys each query sees alone, as ``(keys, values, block)`` with keys and values
    ``[B, kv, 1, Tq, d]``: block 0's of the alone queries (when there are any), then the
    diagonal of every later block."""
    queries = spans.alone.shape[1]
    blocks = (key.shape[2] - block_length) // queries
    singles = []
    if spans.has_alone:
        block_key, block_value = key[:, :, :block_length], value[:, :, :block_length]
        if spans.alone_key is not None:
            index = spans.alone_key[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
            block_key, block_value = block_key.gather(2, index), block_value.gather(2, index)
        singles.append((block_key.to(acc)[:, :, None], block_value.to(acc)[:, :, None], 0))
    for block in range(1, blocks + 1):
        keys = slice(block_length + (block - 1) * queries, block_length + block * queries)
        singles.append(
            (key[:, :, keys].to(acc)[:, :, None], value[:, :, keys].to(acc)[:, :, None], block)
        )
    return singles


class _SplitAttention(torch.autograd.Function):
    """The kernel of the module docstring, with its flash-style backward."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,  # [B, heads, Tq, d]
        key: torch.Tensor,  # [B, kv_heads, T + s * Tq, d]
        value: torch.Tensor,  # [B, kv_heads, T + s * Tq, d]
        spans: BlockZeroSpans,
        block_length: int,
        scale: float,
    ) -> torch.Tensor:
        ops = _flash_ops()
        assert ops is not None
        flash_forward = ops[0]
        batch, heads, queries, dim = query.shape
        kv_heads = key.shape[1]
        # What the flash kernel accumulates (and returns the log-sum-exp) in.
        acc = torch.promote_types(query.dtype, torch.float32)
        minus_inf = float("-inf")

        # Block 0 over each span: the causal part, and the prefix where there is one.
        causal_out = query.new_zeros(batch, heads, queries, dim)
        causal_lse = query.new_full((batch, heads, queries), minus_inf, dtype=acc)
        has_prefix = any(first > doc_start for _, _, _, doc_start, first in spans.spans)
        prefix_out = query.new_zeros(batch, heads, queries, dim) if has_prefix else None
        prefix_lse = query.new_full((batch, heads, queries), minus_inf, dtype=acc)
        for row, q_start, q_end, doc_start, first in spans.spans:
            rows, q = slice(row, row + 1), slice(q_start, q_end)
            causal = slice(first, first + q_end - q_start)
            out, lse = flash_forward(
                query[rows, :, q],
                key[rows, :, causal],
                value[rows, :, causal],
                0.0,
                True,
                scale=scale,
            )
            causal_out[rows, :, q], causal_lse[rows, :, q] = out, lse
            if prefix_out is not None and first > doc_start:
                prefix = slice(doc_start, first)
                out, lse = flash_forward(
                    query[rows, :, q],
                    key[rows, :, prefix],
                    value[rows, :, prefix],
                    0.0,
                    False,
                    scale=scale,
                )
                prefix_out[rows, :, q], prefix_lse[rows, :, q] = out, lse

        # Every piece's log-sum-exp and output; single keys have their score and value.
        query_g = _grouped(query.to(acc), kv_heads)  # [B, kv, G, Tq, d]
        scores = [_grouped(causal_lse, kv_heads)]  # [B, kv, G, Tq]
        values = [_grouped(causal_out.to(acc), kv_heads)]  # [B, kv, G, Tq, d]
        if prefix_out is not None:
            scores.append(_grouped(prefix_lse, kv_heads))
            values.append(_grouped(prefix_out.to(acc), kv_heads))
        for single_key, single_value, block in _single_keys(key, value, spans, block_length, acc):
            score = (query_g * single_key).sum(-1) * scale
            if block == 0:  # alone queries: their one block-0 key stands in for the spans
                alone = spans.alone[:, None, None, :]  # [B, 1, 1, Tq]
                scores[0] = torch.where(alone, score, scores[0])
                values[0] = torch.where(alone[..., None], single_value, values[0])
            else:
                scores.append(score)
                values.append(single_value)
        stacked = torch.stack(scores)  # [pieces, B, kv, G, Tq]
        lse = torch.logsumexp(stacked, dim=0)  # [B, kv, G, Tq]
        weights = (stacked - lse).exp_()
        combined = weights[0][..., None] * values[0]
        for piece in range(1, len(values)):
            combined = combined + weights[piece][..., None] * values[piece]
        result = combined.flatten(1, 2).to(query.dtype)  # [B, heads, Tq, d]

        ctx.save_for_backward(query, key, value, result, lse.flatten(1, 2), weights)
        ctx.spans, ctx.block_length, ctx.scale = spans, block_length, scale
        ctx.has_prefix = prefix_out is not None
        return result

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        ops = _flash_ops()
        assert ops is not None
        flash_backward = ops[1]
        query, key, value, out, lse, weights = ctx.saved_tensors
        spans: BlockZeroSpans = ctx.spans
        block_length: int = ctx.block_length
        scale: float = ctx.scale
        kv_heads = key.shape[1]
        acc = lse.dtype

        grad_query = torch.zeros_like(query)
        grad_key = torch.zeros_like(key)
        grad_value = torch.zeros_like(value)
        # Block 0 inside the spans: flash backward with the combined output and lse.
        for row, q_start, q_end, doc_start, first in spans.spans:
            rows, q = slice(row, row + 1), slice(q_start, q_end)
            parts = [(slice(first, first + q_end - q_start), True)]
            if first > doc_start:
                parts.append((slice(doc_start, first), False))
            for keys, causal in parts:
                grads = flash_backward(
                    grad_out[rows, :, q],
                    query[rows, :, q],
                    key[rows, :, keys],
                    value[rows, :, keys],
                    out[rows, :, q],
                    lse[rows, :, q],
                    0.0,
                    causal,
                    scale=scale,
                )
                grad_query[rows, :, q] += grads[0]
                grad_key[rows, :, keys] += grads[1]
                grad_value[rows, :, keys] += grads[2]

        # Single keys: dS = w (dO . v - rowsum(dO * out)).
        grad_g = _grouped(grad_out.to(acc), kv_heads)  # [B, kv, G, Tq, d]
        query_g = _grouped(query.to(acc), kv_heads)
        row_dot = (grad_g * _grouped(out.to(acc), kv_heads)).sum(-1)  # [B, kv, G, Tq]
        queries = query.shape[2]
        first_block_piece = 2 if ctx.has_prefix else 1  # pieces: spans, [prefix], blocks 1..
        grad_query_g: torch.Tensor | None = None  # [B, kv, G, Tq, d], before the scale
        for single_key, single_value, block in _single_keys(key, value, spans, block_length, acc):
            if block == 0:  # the alone queries share their weight slot with the spans
                weight = weights[0] * spans.alone[:, None, None, :]
            else:
                weight = weights[first_block_piece + block - 1]
            grad_score = weight * ((grad_g * single_value).sum(-1) - row_dot)  # [B, kv, G, Tq]
            term = grad_score[..., None] * single_key
            grad_query_g = term if grad_query_g is None else grad_query_g.add_(term)
            key_grad = ((grad_score[..., None] * query_g).sum(2) * scale).to(key.dtype)
            value_grad = (weight[..., None] * grad_g).sum(2).to(value.dtype)
            if block == 0 and spans.alone_key is not None:
                index = spans.alone_key[:, None, :, None].expand_as(key_grad)
                grad_key[:, :, :block_length].scatter_add_(2, index, key_grad)
                grad_value[:, :, :block_length].scatter_add_(2, index, value_grad)
            else:
                start = block_length + (block - 1) * queries if block else 0
                grad_key[:, :, start : start + queries] += key_grad
                grad_value[:, :, start : start + queries] += value_grad
        if grad_query_g is not None:
            grad_query += (grad_query_g * scale).flatten(1, 2).to(query.dtype)
        return grad_query, grad_key, grad_value, None, None, None
