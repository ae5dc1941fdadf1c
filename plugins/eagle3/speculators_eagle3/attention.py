"""Attention for EAGLE-3 drafts: the TTT masks of FORMAT.md 3.3, a KV cache, and the kernels.

Training-time test (TTT) runs the draft ``S`` times over the same packed row of ``T`` positions.
Step ``s`` appends ``T`` new keys/values to the cache, so its queries see ``(s + 1) * T`` keys:

* block 0 (the verifier-fed step): key ``j`` is visible to query ``t`` when ``j <= t`` and both
  lie in the same document (a padding query, document id -1, sees only itself);
* blocks 1..s (the draft's own earlier steps): only the key at the query's own index ``t``.

That is exactly what the draft sees at inference time when, after context position ``t``, it has
drafted ``s`` tokens: the true context up to ``t`` and its own ``s`` drafted states.

Three kernels apply the masks: ``sdpa`` (torch's fused attention, boolean mask), ``eager``
(explicit softmax, additive mask) and ``flex`` (``flex_attention`` with a block mask; CUDA only,
because flex attention has no CPU backward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from speculators_core import SpeculatorsError

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "KVCache",
    "attend",
    "flex_attention_available",
    "select_attention_implementation",
    "ttt_attention_mask",
    "ttt_block_mask",
    "ttt_mask_mod",
]

#: Kernels a draft can run its attention with ("auto" picks one, see select_attention_implementation).
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flex")


@functools.cache
def flex_attention_available() -> bool:
    """Whether this torch ships ``torch.nn.attention.flex_attention``."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention_implementation(requested: str, device: torch.device | str) -> str:
    """The attention kernel to use for tensors on ``device``.

    ``"auto"`` picks ``flex`` on a CUDA device (when torch has it) and ``sdpa`` everywhere else.
    An explicit ``"flex"`` on a non-CUDA device is refused: flex attention has no CPU backward,
    so training would fail at the first ``backward()``.
    """
    device = torch.device(device)
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_attention_available() else "sdpa"
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise SpeculatorsError(
            f"unknown attention implementation '{requested}'; use one of auto, "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if requested == "flex" and device.type != "cuda":
        raise SpeculatorsError(
            f"attention implementation 'flex' needs a CUDA device, but the draft runs on "
            f"'{device}' (flex attention has no CPU backward); use 'sdpa' or 'eager'"
        )
    return requested


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def ttt_attention_mask(document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """The dense boolean mask of TTT step ``step``: ``[B, 1, T, (step + 1) * T]``, True = attend.

    ``document_ids`` (``[B, T]``) holds each position's document within its row, -1 on positions
    that take no part (padding, or the last token of a document after the next-token shift).
    """
    batch, length = document_ids.shape
    positions = torch.arange(length, device=document_ids.device)
    causal = positions[None, :] <= positions[:, None]  # [T(q), T(kv)]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T(q), T(kv)]
    real_query = (document_ids >= 0)[:, :, None]  # [B, T(q), 1]
    diagonal = torch.eye(length, dtype=torch.bool, device=document_ids.device)
    first_block = (causal & same_doc & real_query) | diagonal  # [B, T, T]
    blocks = [first_block] + [diagonal.expand(batch, length, length)] * step
    return torch.cat(blocks, dim=-1)[:, None]  # [B, 1, T, (step + 1) * T]


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


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys and values, ``[B, kv_heads, length, head_dim]``, grown by concatenation.

    TTT appends ``T`` positions per step; drafting appends verified context, then drafted
    positions that :meth:`truncate` drops again.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Number of cached positions (of layer 0)."""
        first = self.keys[0]
        return 0 if first is None else int(first.shape[2])

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key``/``value`` of ``layer``; return everything cached for it."""
        old_key, old_value = self.keys[layer], self.values[layer]
        if old_key is not None and old_value is not None:
            key = torch.cat([old_key, key], dim=2)
            value = torch.cat([old_value, value], dim=2)
        self.keys[layer], self.values[layer] = key, value
        return key, value

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer."""
        for layer, (key, value) in enumerate(zip(self.keys, self.values, strict=True)):
            if key is not None and value is not None:
                self.keys[layer] = key[:, :, :length]
                self.values[layer] = value[:, :, :length]


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex attention materializes the full score matrix; compiling is what makes it
    # a fused kernel (and it is only ever used on CUDA).
    return torch.compile(flex_attention, dynamic=False)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    *,
    implementation: str,
    scale: float,
) -> torch.Tensor:
    """Masked attention of ``query`` ``[B, heads, Tq, d]`` over ``key``/``value`` ``[B, kv_heads, Tk, d]``.

    ``mask`` is a boolean ``[B, 1, Tq, Tk]`` tensor (True = attend) or None (attend to all) for
    ``sdpa``/``eager``, a ``BlockMask`` for ``flex``. Returns ``[B, Tq, heads, d]``.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if implementation == "flex":
        out = _compiled_flex_attention()(
            query, key, value, block_mask=mask, scale=scale, enable_gqa=heads != kv_heads
        )
        return out.transpose(1, 2)
    if heads != kv_heads:
        # Grouped-query attention: query head i reads kv head i // (heads // kv_heads).
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    if implementation == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale
        )
    elif implementation == "eager":
        scores = torch.matmul(query, key.transpose(2, 3)) * scale  # [B, heads, Tq, Tk]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
    else:
        raise SpeculatorsError(
            f"unknown attention implementation '{implementation}'; use one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return out.transpose(1, 2)  # [B, Tq, heads, d]
