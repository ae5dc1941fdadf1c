"""Attention for EAGLE-3 drafts: the TTT masks of FORMAT.md 3.3 and how the kernels apply them.

Training-time test (TTT) runs the draft ``S`` times over the same packed row of ``T`` positions.
Step ``s`` appends ``T`` new keys/values to the cache, so its queries see ``(s + 1) * T`` keys:

* block 0 (the verifier-fed step): key ``j`` is visible to query ``t`` when ``j <= t`` and both
  lie in the same document (a padding query, document id -1, sees only itself);
* blocks 1..s (the draft's own earlier steps): only the key at the query's own index ``t``.

That is exactly what the draft sees at inference time when, after context position ``t``, it has
drafted ``s`` tokens: the true context up to ``t`` and its own ``s`` drafted states.

The core's three kernels (:func:`speculators_core.modeling.attend`: ``sdpa``, ``eager``,
``flex``; the KV cache is the core's too) apply the masks. The TTT forward hands them a
:class:`TTTMask` (the documents of the batch, built once; a core ``StructuredMask``) instead of a
dense tensor: on the CPU, ``sdpa`` then
runs the split kernel of :mod:`speculators_eagle3.split_attention` (causal flash attention per
document plus the diagonal keys, the same softmax without the ``T x (s + 1) T`` mask); the
other kernels expand it to the dense mask of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from speculators_core import SpeculatorsError
from speculators_core.modeling.attention import StructuredMask, attend

__all__ = [
    "BlockZeroSpans",
    "TTTMask",
    "ttt_attention_mask",
    "ttt_block_mask",
    "ttt_mask_mod",
]


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def ttt_attention_mask(document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """The dense boolean mask of TTT step ``step``: ``[B, 1, T, (step + 1) * T]``, True = attend.

    ``document_ids`` (``[B, T]``) holds each position's document within its row, -1 on positions
    that take no part (padding, or the last token of a document after the next-token shift).
    """
    return _extend_first_block(_first_block(document_ids), step)


def _first_block(document_ids: torch.Tensor) -> torch.Tensor:
    """Block 0 of the TTT mask, ``[B, T(q), T(kv)]``: causal within documents, or only itself."""
    length = document_ids.shape[1]
    positions = torch.arange(length, device=document_ids.device)
    causal = positions[None, :] <= positions[:, None]  # [T(q), T(kv)]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T(q), T(kv)]
    real_query = (document_ids >= 0)[:, :, None]  # [B, T(q), 1]
    diagonal = torch.eye(length, dtype=torch.bool, device=document_ids.device)
    return (causal & same_doc & real_query) | diagonal


def _extend_first_block(first_block: torch.Tensor, step: int) -> torch.Tensor:
    """The step-``step`` mask from block 0: ``step`` diagonal blocks appended, ``[B, 1, T, *]``."""
    batch, length, _ = first_block.shape
    diagonal = torch.eye(length, dtype=torch.bool, device=first_block.device)
    blocks = [first_block] + [diagonal.expand(batch, length, length)] * step
    return torch.cat(blocks, dim=-1)[:, None]  # [B, 1, T, (step + 1) * T]


@dataclass(frozen=True)
class BlockZeroSpans:
    """Block 0 of a :class:`TTTMask` in pieces that flash attention computes, per row.

    A span ``(row, q_start, q_end, doc_start, first)`` says: queries ``q_start..q_end-1`` of the
    row are the consecutive positions ``first, first + 1, ...`` of a document that begins at
    ``doc_start``; they see the keys ``doc_start..first-1`` all (the *prefix*) and the keys
    ``first..`` causally. Every other query sees one block-0 key alone (``alone``, at
    ``alone_key``).
    """

    spans: list[tuple[int, int, int, int, int]]
    alone: torch.Tensor  # [B, Tq] bool
    #: ``[B, Tq]`` int64: the block-0 key an alone query sees (0 elsewhere); None when the
    #: queries are the positions themselves (each alone query's key is its own index).
    alone_key: torch.Tensor | None
    has_alone: bool  # whether any query is alone (the kernel skips that piece otherwise)


class TTTMask(StructuredMask):
    """The TTT masks of one packed batch, kept as the batch's documents (built once per batch).

    ``document_ids`` (``[B, T]``, aligned, -1 = takes no part) describes block 0, the ``T``
    keys of step 0. The queries are either the ``T`` positions themselves or, after
    :meth:`compacted`, chosen positions per row (``query_positions``, ``[B, Tq]``; -1 pads a
    row, and such a slot sees key 0 of block 0, the view of position 0), the ones the training
    step needs: each later block then holds the keys of those same ``Tq`` queries, so block
    ``i`` key ``j`` is query ``j``'s own. Which step's mask applies follows from the key length,
    ``T + step * Tq``.

    :meth:`dense` gives the boolean mask (for the full layout, exactly
    :func:`ttt_attention_mask`'s); the split kernel reads :meth:`block_zero_spans`.
    """

    def __init__(
        self, document_ids: torch.Tensor, query_positions: torch.Tensor | None = None
    ) -> None:
        self.document_ids = document_ids
        self.query_positions = query_positions
        self._first_block: torch.Tensor | None = None
        self._spans: BlockZeroSpans | None = None
        self._spans_known = False

    @property
    def num_keys_per_step(self) -> tuple[int, int]:
        """``(T, Tq)``: keys of block 0, and of every later block (one per query)."""
        length = self.document_ids.shape[1]
        queries = length if self.query_positions is None else self.query_positions.shape[1]
        return length, queries

    def compacted(self, query_positions: torch.Tensor) -> TTTMask:
        """The masks of queries at ``query_positions`` only (``[B, Tq]``, ascending per row, -1
        padding at the end), over the same block 0."""
        mask = TTTMask(self.document_ids, query_positions)
        mask._first_block = self._first_block
        return mask

    def step_of(self, num_keys: int) -> int:
        """The step whose cache holds ``num_keys`` keys."""
        length, queries = self.num_keys_per_step
        step = (num_keys - length) // queries if queries else 0
        if num_keys < length or length + step * queries != num_keys:
            raise SpeculatorsError(
                f"TTT attention got {num_keys} keys for {queries} queries over a block 0 of "
                f"{length}; the keys must be T + step * Tq (pass the cache the TTT steps filled)"
            )
        return step

    def dense(self, step: int) -> torch.Tensor:
        """The boolean mask of step ``step``, ``[B, 1, Tq, T + step * Tq]``, True = attend."""
        if self._first_block is None:
            self._first_block = _first_block(self.document_ids)
        first = self._first_block  # [B, T, T]
        if self.query_positions is not None:
            # Padding slots take row 0: position 0 sees only key 0 (a row starts a document).
            rows = self.query_positions.clamp(min=0)[:, :, None].expand(-1, -1, first.shape[2])
            first = first.gather(1, rows)
        return _extend_first_block(first, step)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        implementation: str,
        scale: float,
    ) -> torch.Tensor:
        """TTT attention of ``query`` over the cached ``key``/``value``: ``[B, Tq, heads, d]``.

        The split kernel of :mod:`speculators_eagle3.split_attention` for ``sdpa`` where it
        applies, else the kernel asked for over the dense mask of the step.
        """
        from speculators_eagle3.split_attention import split_attention, split_attention_applies

        step = self.step_of(key.shape[2])
        if implementation == "sdpa" and split_attention_applies(query, key, self):
            return split_attention(query, key, value, self, scale=scale).transpose(1, 2)
        return attend(
            query, key, value, self.dense(step), implementation=implementation, scale=scale
        )

    def block_zero_spans(self) -> BlockZeroSpans | None:
        """Block 0 as flash-attention spans, or None when a document of some row is not one
        contiguous run (only the dense mask describes that)."""
        if not self._spans_known:
            self._spans = _block_zero_spans(self.document_ids, self.query_positions)
            self._spans_known = True
        return self._spans


def _block_zero_spans(
    document_ids: torch.Tensor, query_positions: torch.Tensor | None
) -> BlockZeroSpans | None:
    docs = document_ids.tolist()
    batch, length = document_ids.shape
    # Where each position's document begins; None outside documents of two or more positions.
    starts: list[list[int | None]] = []
    for ids in docs:
        row_starts: list[int | None] = [None] * length
        seen: set[int] = set()
        begin = 0
        for end in range(1, length + 1):
            if end < length and ids[end] == ids[begin]:
                continue
            if ids[begin] >= 0:
                if ids[begin] in seen:  # a document in two runs
                    return None
                seen.add(ids[begin])
                if end - begin > 1:
                    row_starts[begin:end] = [begin] * (end - begin)
            begin = end
        starts.append(row_starts)
    queries = [list(range(length))] * batch if query_positions is None else query_positions.tolist()
    spans: list[tuple[int, int, int, int, int]] = []
    alone: list[list[bool]] = []
    alone_key: list[list[int]] = []
    for row, positions in enumerate(queries):
        row_alone, row_key = [False] * len(positions), [0] * len(positions)
        open_span: list[int] | None = None  # [q_start, q_end, doc_start, first]
        for q, t in enumerate(positions):
            doc_start = starts[row][t] if t >= 0 else None
            if doc_start is None:  # outside documents, alone in one, or padding (key 0)
                row_alone[q], row_key[q] = True, max(t, 0)
                continue
            if (
                open_span is not None
                and open_span[1] == q
                and open_span[2] == doc_start
                and open_span[3] + (q - open_span[0]) == t
            ):
                open_span[1] = q + 1
                continue
            if open_span is not None:
                spans.append((row, *_four(open_span)))
            open_span = [q, q + 1, doc_start, t]
        if open_span is not None:
            spans.append((row, *_four(open_span)))
        alone.append(row_alone)
        alone_key.append(row_key)
    device = document_ids.device
    return BlockZeroSpans(
        spans,
        torch.tensor(alone, dtype=torch.bool, device=device).reshape(batch, -1),
        None
        if query_positions is None
        else torch.tensor(alone_key, dtype=torch.long, device=device).reshape(batch, -1),
        any(any(row) for row in alone),
    )


def _four(values: list[int]) -> tuple[int, int, int, int]:
    first, second, third, fourth = values
    return first, second, third, fourth


def ttt_mask_mod(document_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The same mask as :func:`ttt_attention_mask`, as a flex-attention ``mask_mod``.

    It is valid for every step: the key length (``(step + 1) * T``) is given when the block mask
    is built.
    """
    length = document_ids.shape[1]

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        kv_pos = kv_idx % length
        query_doc = document_ids[b, q_idx]
        in_context = (
            (kv_idx < length)
            & (kv_pos <= q_idx)
            & (document_ids[b, kv_pos] == query_doc)
            & (query_doc >= 0)
        )
        return in_context | (kv_pos == q_idx)

    return mask_mod


def ttt_block_mask(document_ids: torch.Tensor, step: int) -> Any:
    """A flex-attention ``BlockMask`` for TTT step ``step`` (built on ``document_ids``' device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = document_ids.shape
    return create_block_mask(
        ttt_mask_mod(document_ids),
        B=batch,
        H=None,
        Q_LEN=length,
        KV_LEN=(step + 1) * length,
        device=document_ids.device,
    )
