"""The validator's plain-torch source forward against a third implementation: transformers' Llama layer.

If the reference were wrong in the same way as the target classes, validation would pass
wrongly; this pins it to transformers' ``LlamaDecoderLayer`` (EAGLE-1: no input norm in layer 0,
FORMAT.md 3.1).
"""

from __future__ import annotations

import torch
from speculators_converters.validate import LayerDims, eagle1_reference
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def test_eagle1_reference_matches_transformers_llama_layer() -> None:
    torch.manual_seed(0)
    hidden, vocab, length = 64, 50, 6
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        attn_implementation="eager",
    )
    layer = LlamaDecoderLayer(config, layer_idx=0).double().eval()
    layer.input_layernorm = torch.nn.Identity()  # EAGLE-1's layer 0
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.1)
        layer.post_attention_layernorm.weight.add_(1.0)
    fc = torch.randn(hidden, 2 * hidden, dtype=torch.float64) * 0.1
    bias = torch.randn(hidden, dtype=torch.float64) * 0.1
    embed = torch.randn(vocab, hidden, dtype=torch.float64)
    lm_head = torch.randn(vocab, hidden, dtype=torch.float64) * 0.1
    ids = torch.randint(0, vocab, (2, length))
    features = torch.randn(2, length, hidden, dtype=torch.float64)

    # transformers: fc, then the decoder layer with RoPE and a causal mask.
    g = torch.cat([embed[ids], features], dim=-1) @ fc.T + bias
    positions = torch.arange(length).expand(2, length)
    rotary = LlamaRotaryEmbedding(config).double()
    cos, sin = rotary(g, positions)
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        out = layer(g, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
    out = out[0] if isinstance(out, tuple) else out
    expected = out @ lm_head.T

    tensors = {f"layers.0.{n}": p.detach() for n, p in layer.named_parameters()}
    tensors.update({"fc.weight": fc, "fc.bias": bias})
    dims = LayerDims.from_config(
        {
            "hidden_size": hidden,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000.0,
        }
    )
    got = eagle1_reference(
        tensors.__getitem__,
        tensors.__contains__,
        dims,
        input_ids=ids,
        features=features,
        embed=embed,
        lm_head=lm_head,
    )
    assert torch.allclose(got, expected, atol=1e-9), (got - expected).abs().max()
