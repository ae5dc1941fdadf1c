"""``--validate``: the converted draft against the source's own forward, then ``speculators check``.

The source's forward is written here directly, in plain float64 PyTorch, from the published
maths (FORMAT.md 3.1 for EAGLE-1/2/HASS, 3.2 for EAGLE-3, FORMAT-PARALLEL.md 3.3 for DFlash)
and the *source's* tensor names; it
shares no code with the target model classes. On random token ids and random verifier features
both give one draft step's logits over the verifier vocabulary (EAGLE-3: draft logits scattered
to the verifier ids through ``d2t``, ``-inf`` elsewhere); they must agree within a tolerance
(the converted draft runs in float32, the reference in float64, both from the same stored
values). The comparison, the reload and the lint belong to the core
(:mod:`speculators_core.conversion`); converters return :func:`source_forward`.

Validation reads every tensor whole (memory ~ the checkpoint); the conversion itself does not.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speculators_core.conversion import ReferenceForward
from speculators_core.errors import ConversionError

__all__ = [
    "LayerDims",
    "dflash_reference",
    "eagle1_reference",
    "eagle3_reference",
    "source_forward",
]

logger = logging.getLogger(__name__)

#: Tensors are looked up by their source name; this returns one as float64.
Getter = Callable[[str], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class LayerDims:
    """The sizes and settings of the source's decoder layer(s), from its own config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    rope: Mapping[str, Any]
    max_position_embeddings: int = 4096

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LayerDims:
        """From a Llama-style config dict (SafeAILab ``config.json`` or a layer config)."""
        from speculators_converters.common import rope_parameters

        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            hidden_act=str(config.get("hidden_act", "silu")),
            rope=rope_parameters(config),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        )


# ------------------------------------------------------------------------------------------------
# Plain-torch pieces (float64)
# ------------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _linear(x: torch.Tensor, get: Getter, prefix: str, has: Callable[[str], bool]) -> torch.Tensor:
    out = x @ get(f"{prefix}.weight").T
    if has(f"{prefix}.bias"):
        out = out + get(f"{prefix}.bias")
    return out


def _rotary(dims: LayerDims, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, head_dim]`` (HF/NeoX half-rotation layout)."""
    rope = dict(dims.rope)
    kind = rope.get("rope_type", "default")
    scale = 1.0
    if kind == "default":
        exponents = torch.arange(0, dims.head_dim, 2, dtype=torch.float64) / dims.head_dim
        inv_freq = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** exponents)
    else:
        # Scaled RoPE variants (llama3, linear, yarn, ...): transformers' own frequency tables.
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = LlamaConfig(
            hidden_size=dims.hidden_size,
            num_attention_heads=dims.num_heads,
            head_dim=dims.head_dim,
            max_position_embeddings=dims.max_position_embeddings,
            rope_parameters=rope,
        )
        inv, scale = ROPE_INIT_FUNCTIONS[kind](config, None)
        inv_freq = inv.to(torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(
    x: torch.Tensor,  # [B, T, in]
    get: Getter,
    has: Callable[[str], bool],
    prefix: str,
    dims: LayerDims,
) -> torch.Tensor:
    batch, length, _ = x.shape
    d = dims.head_dim
    q = _linear(x, get, f"{prefix}.q_proj", has).view(batch, length, dims.num_heads, d)
    k = _linear(x, get, f"{prefix}.k_proj", has).view(batch, length, dims.num_kv_heads, d)
    v = _linear(x, get, f"{prefix}.v_proj", has).view(batch, length, dims.num_kv_heads, d)
    if has(f"{prefix}.q_norm.weight"):  # Qwen3-style per-head norms
        q = _rms_norm(q, get(f"{prefix}.q_norm.weight"), dims.rms_norm_eps)
        k = _rms_norm(k, get(f"{prefix}.k_norm.weight"), dims.rms_norm_eps)
    cos, sin = _rotary(dims, length)
    out = torch.zeros(batch, length, dims.num_heads, d, dtype=x.dtype)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    group = dims.num_heads // dims.num_kv_heads
    for head in range(dims.num_heads):
        qh = _rotate(q[:, :, head], cos, sin)  # [B, T, d]
        kh = _rotate(k[:, :, head // group], cos, sin)
        scores = qh @ kh.transpose(1, 2) / d**0.5  # [B, T, T]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, :, head] = torch.softmax(scores, dim=-1) @ v[:, :, head // group]
    return _linear(out.reshape(batch, length, -1), get, f"{prefix}.o_proj", has)


def _mlp(
    x: torch.Tensor, get: Getter, has: Callable[[str], bool], prefix: str, act: str
) -> torch.Tensor:
    if act not in _ACTIVATIONS:
        raise ConversionError(
            f"cannot validate a draft with hidden_act '{act}'; validation knows "
            f"{', '.join(_ACTIVATIONS)} (convert without --validate)"
        )
    fn = _ACTIVATIONS[act]
    gate = _linear(x, get, f"{prefix}.gate_proj", has)
    up = _linear(x, get, f"{prefix}.up_proj", has)
    return _linear(fn(gate) * up, get, f"{prefix}.down_proj", has)


def _post_attention_mlp(
    h: torch.Tensor, get: Getter, has: Callable[[str], bool], layer: str, dims: LayerDims
) -> torch.Tensor:
    """A decoder layer's MLP on its post-attention-normed residual (the residual not added)."""
    normed = _rms_norm(h, get(f"{layer}.post_attention_layernorm.weight"), dims.rms_norm_eps)
    return _mlp(normed, get, has, f"{layer}.mlp", dims.hidden_act)


# ------------------------------------------------------------------------------------------------
# The sources' forwards
# ------------------------------------------------------------------------------------------------


def eagle1_reference(
    get: Getter,
    has: Callable[[str], bool],
    dims: LayerDims,
    *,
    input_ids: torch.Tensor,  # [B, T]
    features: torch.Tensor,  # [B, T, H] verifier final post-norm states
    embed: torch.Tensor,  # [V, H]
    lm_head: torch.Tensor,  # [V, H] the verifier's
    fc: str = "fc",
    layer: str = "layers.0",
    embedding_norm: str | None = None,
    feature_norm: str | None = None,
    input_norm: str | None = None,
    lm_head_norm: str | None = None,
) -> torch.Tensor:
    """One EAGLE-1/2 step (FORMAT.md 3.1): logits ``[B, T, V]``.

    ``e = Embed(x)`` (normed by ``embedding_norm`` if given), ``f`` normed by ``feature_norm``
    if given (the speculators research HASS forward's ``hidden_layernorm``, before ``fc``),
    ``g = fc([e, f])`` (with bias if stored), one Llama layer whose residual starts at ``g``
    (attention input normed by ``input_norm`` if given, else not normed), no final norm,
    ``logits = lm_head(h)`` (after ``lm_head_norm`` if given). Names are the source's.
    """
    eps = dims.rms_norm_eps
    e = embed[input_ids]
    if embedding_norm is not None:
        e = _rms_norm(e, get(embedding_norm), eps)
    if feature_norm is not None:
        features = _rms_norm(features, get(feature_norm), eps)
    g = _linear(torch.cat([e, features], dim=-1), get, fc, has)
    attn_in = _rms_norm(g, get(input_norm), eps) if input_norm is not None else g
    h = g + _attention(attn_in, get, has, f"{layer}.self_attn", dims)
    h = h + _post_attention_mlp(h, get, has, layer, dims)
    if lm_head_norm is not None:
        h = _rms_norm(h, get(lm_head_norm), eps)
    return h @ lm_head.T


def eagle3_reference(
    get: Getter,
    has: Callable[[str], bool],
    dims: LayerDims,
    *,
    input_ids: torch.Tensor,  # [B, T]
    aux: torch.Tensor,  # [B, T, n*Ht] concatenated verifier aux states
    embed: torch.Tensor,  # [V, H]
    vocab_size: int,
    layers: list[str],  # source prefixes of the decoder layers, first one the 2H-input layer
    norm_before_residual: bool,
    norm_before_fc: bool = False,
    fc_norm: int = 0,  # number of per-state norms ``fc_norm.{i}`` (0 = none)
) -> torch.Tensor:
    """One EAGLE-3 step (FORMAT.md 3.2): logits ``[B, T, V]``, ``-inf`` outside the draft vocab."""
    eps = dims.rms_norm_eps
    if norm_before_fc:
        aux = _rms_norm(aux, get("input_norm.weight"), eps)
    if fc_norm:
        chunks = aux.chunk(fc_norm, dim=-1)
        aux = torch.cat(
            [_rms_norm(c, get(f"fc_norm.{i}.weight"), eps) for i, c in enumerate(chunks)], dim=-1
        )
    g = aux @ get("fc.weight").T  # [B, T, H]
    first = layers[0]
    e = _rms_norm(embed[input_ids], get(f"{first}.input_layernorm.weight"), eps)
    u = _rms_norm(g, get(f"{first}.hidden_norm.weight"), eps)
    h = (u if norm_before_residual else g) + _attention(
        torch.cat([e, u], dim=-1), get, has, f"{first}.self_attn", dims
    )
    h = h + _post_attention_mlp(h, get, has, first, dims)
    for prefix in layers[1:]:
        h = h + _attention(
            _rms_norm(h, get(f"{prefix}.input_layernorm.weight"), eps),
            get,
            has,
            f"{prefix}.self_attn",
            dims,
        )
        h = h + _post_attention_mlp(h, get, has, prefix, dims)
    draft_logits = _rms_norm(h, get("norm.weight"), eps) @ get("lm_head.weight").T  # [B, T, Vd]
    draft_vocab = draft_logits.shape[-1]
    target_ids = torch.arange(draft_vocab)
    if has("d2t"):
        target_ids = target_ids + get("d2t").round().long()
    full = torch.full((*draft_logits.shape[:-1], vocab_size), float("-inf"), dtype=torch.float64)
    full[..., target_ids] = draft_logits
    return full


def _block_attention(
    block: torch.Tensor,  # [Q, H] block states after the input norm
    context: torch.Tensor,  # [C, H] context states (positions 0..C-1), not normed
    get: Getter,
    has: Callable[[str], bool],
    prefix: str,
    dims: LayerDims,
    *,
    causal_block: bool,
    window: int | None,
) -> torch.Tensor:
    """DFlash attention: block queries at positions ``C..C+Q-1`` over the context keys and the
    block's own keys (all of them, or earlier ones with ``causal_block``)."""
    d, num_ctx, num_q = dims.head_dim, context.shape[0], block.shape[0]
    eps = dims.rms_norm_eps
    q = _linear(block, get, f"{prefix}.q_proj", has).view(num_q, dims.num_heads, d)
    keys = torch.cat([context, block])  # the block's keys/values follow the context's
    k = _linear(keys, get, f"{prefix}.k_proj", has).view(-1, dims.num_kv_heads, d)
    v = _linear(keys, get, f"{prefix}.v_proj", has).view(-1, dims.num_kv_heads, d)
    q = _rms_norm(q, get(f"{prefix}.q_norm.weight"), eps)
    k = _rms_norm(k, get(f"{prefix}.k_norm.weight"), eps)
    cos, sin = _rotary(dims, num_ctx + num_q)
    key_pos = torch.arange(num_ctx + num_q)
    query_pos = torch.arange(num_ctx, num_ctx + num_q)
    visible = torch.ones(num_q, num_ctx + num_q, dtype=torch.bool)
    if window is not None:  # measured from the anchor, as DFlash training does
        visible[:, :num_ctx] &= key_pos[None, :num_ctx] >= num_ctx - window
    if causal_block:
        visible[:, num_ctx:] &= key_pos[None, num_ctx:] <= query_pos[:, None]
    out = torch.zeros(num_q, dims.num_heads, d, dtype=block.dtype)
    group = dims.num_heads // dims.num_kv_heads
    for head in range(dims.num_heads):
        qh = _rotate(q[:, head], cos[query_pos], sin[query_pos])
        kh = _rotate(k[:, head // group], cos, sin)
        scores = (qh @ kh.T / d**0.5).masked_fill(~visible, float("-inf"))
        out[:, head] = torch.softmax(scores, dim=-1) @ v[:, head // group]
    return _linear(out.reshape(num_q, -1), get, f"{prefix}.o_proj", has)


def dflash_reference(
    get: Getter,
    has: Callable[[str], bool],
    dims: LayerDims,
    *,
    input_ids: torch.Tensor,  # [B, T]: the token after each feature's position (the anchor)
    aux: torch.Tensor,  # [B, T, n*Ht] concatenated verifier aux states
    embed: torch.Tensor,  # [V, H] the verifier's (DFlash drafts share it)
    lm_head: torch.Tensor,  # [Vd, H]: the source's own head, or the verifier's
    vocab_size: int,
    layers: list[str],  # source prefixes of the decoder layers
    block_size: int,
    mask_token_id: int,
    causal_block: bool,
    window: int | None,
) -> torch.Tensor:
    """The first drafted token of a DFlash block after every position (FORMAT-PARALLEL.md 3.3):
    logits ``[B, T, V]``, ``-inf`` outside the draft vocabulary.

    For position ``t``: context ``c = hidden_norm(fc(aux_{0..t}))`` (keys/values without an
    input norm), block ``[input_ids[t], mask x (block_size - 1)]`` at positions ``t+1..``
    through pre-norm decoder layers, ``lm_head(norm(h))`` of mask slot 1.
    """
    eps = dims.rms_norm_eps
    context_all = _rms_norm(aux @ get("fc.weight").T, get("hidden_norm.weight"), eps)
    batch, length = input_ids.shape
    draft_logits = torch.zeros(batch, length, lm_head.shape[0], dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            context = context_all[b, : t + 1]
            tokens = torch.full((block_size,), mask_token_id, dtype=torch.long)
            tokens[0] = input_ids[b, t]
            h = embed[tokens]
            for prefix in layers:
                h = h + _block_attention(
                    _rms_norm(h, get(f"{prefix}.input_layernorm.weight"), eps),
                    context,
                    get,
                    has,
                    f"{prefix}.self_attn",
                    dims,
                    causal_block=causal_block,
                    window=window,
                )
                h = h + _post_attention_mlp(h, get, has, prefix, dims)
            draft_logits[b, t] = _rms_norm(h[1], get("norm.weight"), eps) @ lm_head.T
    target_ids = torch.arange(lm_head.shape[0])
    if has("d2t"):
        target_ids = target_ids + get("d2t").round().long()
    full = torch.full((batch, length, vocab_size), float("-inf"), dtype=torch.float64)
    full[..., target_ids] = draft_logits
    return full


# ------------------------------------------------------------------------------------------------
# What the converter returns: the source's forward, for the core's --validate
# ------------------------------------------------------------------------------------------------


def source_forward(
    verifier: Path,
    reference: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    *,
    feature_width: int,
    vocab_size: int,
    expected_findings: frozenset[str] = frozenset(),
) -> ReferenceForward:
    """Wrap ``reference(input_ids, features, verifier_parts)`` as the core's ReferenceForward.

    The verifier's embedding and LM head (which drafts share with the verifier) are read only
    when the core actually validates.
    """

    @functools.cache
    def parts() -> Any:
        from speculators_core.modeling import load_verifier_parts

        return load_verifier_parts(verifier)

    return ReferenceForward(
        forward=lambda ids, features: reference(ids, features, parts()),
        feature_width=feature_width,
        vocab_size=vocab_size,
        expected_findings=expected_findings,
    )
