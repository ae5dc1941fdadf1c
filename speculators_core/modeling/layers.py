"""Decoder building blocks of EAGLE-style drafts: RMSNorm, gated MLP, RoPE attention, layer.

Parameter names are those of transformers' Llama/Qwen3 layers (``self_attn.{q,k,v,o}_proj``,
``self_attn.{q,k}_norm``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``), which is what the speculators format, upstream speculators and
vLLM name a draft's tensors. Attention runs over a :class:`~speculators_core.modeling.attention.KVCache`
with :func:`~speculators_core.modeling.attention.attend`, so one module serves training (a
cache grown step by step under the algorithm's masks) and drafting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from speculators_core.modeling.attention import KVCache, attend

__all__ = ["Attention", "DecoderLayer", "GatedMLP", "RMSNorm", "apply_rotary", "rotate_half"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 (as Llama/Qwen3 do)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[B, heads, T, d]`` with ``cos``/``sin`` ``[B, T, d]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's per-head q/k norms with ``qk_norm``).

    ``input_size`` is the width of the attention input (default the layer's hidden size; EAGLE-3's
    first layer reads ``2H``).
    """

    def __init__(self, config: Any, input_size: int | None = None, *, qk_norm: bool = False):
        super().__init__()
        hidden = config.hidden_size
        input_size = hidden if input_size is None else input_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.scale = self.head_dim**-0.5
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, input_size]
        rotary: tuple[torch.Tensor, torch.Tensor],
        *,
        layer_idx: int = 0,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        query = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = rotary
        query = apply_rotary(query.transpose(1, 2), cos, sin)  # [B, heads, T, d]
        key = apply_rotary(key.transpose(1, 2), cos, sin)  # [B, kv_heads, T, d]
        key, value = cache.update(layer_idx, key, value.transpose(1, 2))  # [B, kv, cached+T, d]
        out = attend(query, key, value, mask, implementation=implementation, scale=self.scale)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer: ``h += attn(input_norm(h))``, ``h += mlp(post_norm(h))``.

    With ``input_layernorm=False`` the input norm is an identity (EAGLE-1's layer 0, whose
    residual stream starts from the fusion output itself, and what vLLM's
    ``EagleLlamaForCausalLM`` builds). ``layer_idx`` is the layer's slot in the KV cache.
    Layers whose attention reads something else than the residual stream override
    :meth:`forward` and call :meth:`residual_block`: EAGLE-3's first layer reads
    ``attention_input_size = 2H`` (the normed embeddings next to a feature normed by
    ``hidden_norm``, which ``hidden_norm=True`` creates; it is registered right after
    ``input_layernorm``, where that layer always had it, because optimizers and gradient-norm
    reductions follow the parameter order).
    """

    def __init__(
        self,
        config: Any,
        layer_idx: int = 0,
        *,
        input_layernorm: bool = True,
        qk_norm: bool = False,
        attention_input_size: int | None = None,
        hidden_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_idx = layer_idx
        self.input_layernorm: nn.Module = RMSNorm(hidden, eps) if input_layernorm else nn.Identity()
        self.hidden_norm = RMSNorm(hidden, eps) if hidden_norm else None
        self.self_attn = Attention(config, attention_input_size, qk_norm=qk_norm)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(
            hidden,
            config.intermediate_size,
            config.hidden_act,
            bool(getattr(config, "mlp_bias", False)),
        )

    def forward(
        self,
        h: torch.Tensor,  # [B, T, H]
        rotary: tuple[torch.Tensor, torch.Tensor],
        *,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        return self.residual_block(
            h,
            self.input_layernorm(h),
            rotary,
            cache=cache,
            mask=mask,
            implementation=implementation,
        )

    def residual_block(
        self,
        residual: torch.Tensor,  # [B, T, H]
        attention_input: torch.Tensor,  # [B, T, attention_input_size]
        rotary: tuple[torch.Tensor, torch.Tensor],
        *,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        """``h = residual + attn(attention_input)``, then ``h + mlp(post_norm(h))``: ``[B, T, H]``."""
        h = residual + self.self_attn(
            attention_input,
            rotary,
            layer_idx=self.layer_idx,
            cache=cache,
            mask=mask,
            implementation=implementation,
        )
        return h + self.mlp(self.post_attention_layernorm(h))
