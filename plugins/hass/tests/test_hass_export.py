"""The export to vLLM's native EAGLE-1 layout, checked against an independent EAGLE-1 forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hass_helpers import capture_features, perturb
from safetensors.torch import load_file
from speculators_hass import EagleDraftModel, export_vllm_eagle

from speculators_core import SpeculatorsError
from speculators_core.modeling import KVCache

EXPORTED = {
    "fc.weight": (64, 128),
    "layers.0.self_attn.q_proj.weight": (64, 64),
    "layers.0.self_attn.k_proj.weight": (32, 64),
    "layers.0.self_attn.v_proj.weight": (32, 64),
    "layers.0.self_attn.o_proj.weight": (64, 64),
    "layers.0.mlp.gate_proj.weight": (128, 64),
    "layers.0.mlp.up_proj.weight": (128, 64),
    "layers.0.mlp.down_proj.weight": (64, 128),
    "layers.0.post_attention_layernorm.weight": (64,),
}


def native_eagle_forward(
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    embed: torch.Tensor,
    tokens: torch.Tensor,
    features: torch.Tensor,
) -> torch.Tensor:
    """EAGLE-1 as vLLM's EagleLlamaForCausalLM computes it, written out from the exported files.

    ``fc(cat[embed(x), h])``, then a Llama layer without input norm (residual = fc output),
    causal GQA attention with RoPE at positions 0.., post-attention RMSNorm and SiLU MLP;
    the output ``h + residual`` is the predicted feature. ``tokens``/``features`` are ``[L]``
    and ``[L, H]``; returns ``[L, H]``.
    """
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config["head_dim"]
    theta = config["rope_parameters"]["rope_theta"]
    length = tokens.shape[0]
    x = torch.cat([embed[tokens], features], dim=-1) @ tensors["fc.weight"].T  # [L, H]
    q = (x @ tensors["layers.0.self_attn.q_proj.weight"].T).view(length, heads, dim)
    k = (x @ tensors["layers.0.self_attn.k_proj.weight"].T).view(length, kv_heads, dim)
    v = (x @ tensors["layers.0.self_attn.v_proj.weight"].T).view(length, kv_heads, dim)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]  # [L, d/2]

    def rope(t: torch.Tensor) -> torch.Tensor:
        cos, sin = angles.cos()[:, None].float(), angles.sin()[:, None].float()
        first, second = t[..., : dim // 2], t[..., dim // 2 :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.zeros(length, heads, dim)
    for head in range(heads):
        kv = head // (heads // kv_heads)
        scores = q[:, head] @ k[:, kv].T / dim**0.5  # [L, L]
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        out[:, head] = torch.softmax(scores, dim=-1) @ v[:, kv]
    h = x + out.reshape(length, heads * dim) @ tensors["layers.0.self_attn.o_proj.weight"].T
    eps = config["rms_norm_eps"]
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = normed * tensors["layers.0.post_attention_layernorm.weight"]
    gate = normed @ tensors["layers.0.mlp.gate_proj.weight"].T
    up = normed @ tensors["layers.0.mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ tensors["layers.0.mlp.down_proj.weight"].T


def test_export_layout(tiny_verifier: Path, tmp_path: Path) -> None:
    """fc/layers.0 names without bias or input norm, no embedding or LM head, a Llama config."""
    model = EagleDraftModel.from_verifier(tiny_verifier)
    model.save_pretrained(tmp_path / "draft")
    out = export_vllm_eagle(tmp_path / "draft", tmp_path / "vllm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == EXPORTED
    config = json.loads((out / "config.json").read_text())
    verifier = json.loads((tiny_verifier / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    assert config["tie_word_embeddings"] is False
    for key in (
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "head_dim",
    ):
        assert config[key] == verifier[key], key
    assert config["rope_parameters"]["rope_theta"] == verifier["rope_parameters"]["rope_theta"]
    assert "speculators_config" not in config


def test_export_computes_what_native_eagle_computes(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    """The exported tensors, run as vLLM's EAGLE-1 layer, predict the draft's own features."""
    model = EagleDraftModel.from_verifier(tiny_verifier).eval()
    perturb(model, seed=5)
    out = export_vllm_eagle(model, tmp_path / "vllm")
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    tokens = torch.randint(0, 259, (12,), generator=torch.Generator().manual_seed(2))
    features = capture_features(verifier_model, tokens)[:, 0]
    embed = verifier_model.model.embed_tokens.weight.detach()
    expected = native_eagle_forward(tensors, config, embed, tokens[1:], features[:-1])
    with torch.no_grad():
        got = model.decode(
            tokens[None, 1:],
            features[None, :-1],
            torch.arange(11)[None],
            cache=KVCache(1),
            mask=torch.ones(11, 11, dtype=torch.bool).tril()[None, None],
            implementation="sdpa",
        )[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # And the logits are the verifier's LM head on those features.
    torch.testing.assert_close(
        model.head(got), verifier_model.lm_head(expected).detach(), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("option", ["fusion_bias", "layernorms", "feature_norm_before_fc"])
def test_export_refuses_what_vllm_cannot_express(
    tiny_verifier: Path, tmp_path: Path, option: str
) -> None:
    """A fusion bias or the extra norms are a one-line error; nothing is written."""
    options: dict[str, Any] = {option: True}
    if option == "feature_norm_before_fc":
        options["layernorms"] = True
    model = EagleDraftModel.from_verifier(tiny_verifier, **options)
    with pytest.raises(SpeculatorsError, match=f"{option}=true") as err:
        export_vllm_eagle(model, tmp_path / "vllm")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "vllm").exists()


def test_export_command_refuses_the_research_norms(tiny_verifier: Path, tmp_path: Path) -> None:
    """``speculators hass export-vllm`` on a feature_norm_before_fc folder: one line, no output."""
    from click.testing import CliRunner
    from speculators_hass.cli import hass_group

    EagleDraftModel.from_verifier(
        tiny_verifier, layernorms=True, feature_norm_before_fc=True
    ).save_pretrained(tmp_path / "draft")
    result = CliRunner().invoke(
        hass_group, ["export-vllm", str(tmp_path / "draft"), str(tmp_path / "vllm")]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, SpeculatorsError)
    message = str(result.exception)
    assert "feature_norm_before_fc=true" in message and "\n" not in message
    assert not (tmp_path / "vllm").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]
