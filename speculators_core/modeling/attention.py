"""The attention kernels draft models run, and the KV cache they attend over.

:func:`attend` computes masked grouped-query attention with one of three kernels: ``sdpa``
(torch's fused attention, boolean mask), ``eager`` (explicit softmax, additive mask) and
``flex`` (``flex_attention`` with a block mask; CUDA only, because flex attention has no CPU
backward). A mask is a dense boolean tensor, None (attend to all), a flex ``BlockMask``, or a
:class:`StructuredMask`: an algorithm's own description of its masks that computes the
attention itself (for example with a kernel that never builds the dense mask) and falls back to
:func:`attend` with a dense mask where it cannot.

:class:`KVCache` holds per-layer keys and values grown by whole blocks: training-time test
(EAGLE-3) and harmonized context alignment (HASS) append one block per step, drafting appends
verified context and drafted positions that it drops again.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from speculators_core.errors import SpeculatorsError

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "KVCache",
    "StructuredMask",
    "attend",
    "flex_attention_available",
    "select_attention_implementation",
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
# KV cache
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys and values, ``[B, kv_heads, length, head_dim]``, grown by concatenation.

    Training steps append ``T`` positions per step; drafting appends verified context, then
    drafted positions that :meth:`truncate` drops again.
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


class StructuredMask(ABC):
    """An attention mask kept as the structure it comes from, which computes attention itself.

    :func:`attend` hands a query, the cached keys/values and the requested kernel to
    :meth:`attend`; an implementation picks a specialised kernel where one applies and otherwise
    calls :func:`attend` again with the dense boolean mask of the situation.
    """

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        implementation: str,
        scale: float,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, heads, Tq, d]`` under this mask: ``[B, Tq, heads, d]``."""


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

    ``mask`` is a boolean ``[B, 1, Tq, Tk]`` tensor (True = attend), a :class:`StructuredMask`
    or None (attend to all) for ``sdpa``/``eager``, a ``BlockMask`` for ``flex``. Returns
    ``[B, Tq, heads, d]``.
    """
    if isinstance(mask, StructuredMask):
        return mask.attend(query, key, value, implementation=implementation, scale=scale)
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
