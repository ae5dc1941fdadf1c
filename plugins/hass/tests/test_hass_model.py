"""Building an eagle draft from a verifier, its saved format (FORMAT.md 1.3), and loading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hass_helpers import draft_from_scratch, pack, perturb, random_samples
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speculators_hass import EagleDraftModel, EagleSpeculatorConfig

from speculators_core import (
    ConfigError,
    GreedyTokenProposalConfig,
    HiddenStateSpec,
    SpeculatorsConfig,
    SpeculatorsError,
    load_config,
    load_speculator,
)
from speculators_core.modeling import KVCache

LAYER_TENSORS = {
    "transformer.self_attn.q_proj.weight": (64, 64),
    "transformer.self_attn.k_proj.weight": (32, 64),
    "transformer.self_attn.v_proj.weight": (32, 64),
    "transformer.self_attn.o_proj.weight": (64, 64),
    "transformer.mlp.gate_proj.weight": (128, 64),
    "transformer.mlp.up_proj.weight": (128, 64),
    "transformer.mlp.down_proj.weight": (64, 128),
    "transformer.post_attention_layernorm.weight": (64,),
}


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def recorded(model: EagleDraftModel) -> SpeculatorsConfig:
    spec = model.config.speculators_config
    assert isinstance(spec, SpeculatorsConfig)
    return spec


def test_from_verifier_copies_sizes_rope_and_verifier_tensors(tiny_verifier: Path) -> None:
    """Sizes, RoPE and vocab come from the verifier; embedding and LM head are its tensors, frozen."""
    model = EagleDraftModel.from_verifier(tiny_verifier)
    config = model.config
    verifier = json.loads((tiny_verifier / "config.json").read_text())
    layer = config.layer_config
    assert layer.model_type == "llama" and layer.num_hidden_layers == 1
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(layer, key) == verifier[key]
    assert layer.vocab_size == verifier["vocab_size"] == 259
    assert layer.tie_word_embeddings is False
    assert layer.rope_parameters["rope_theta"] == verifier["rope_parameters"]["rope_theta"]
    assert config.transformer_layer_architecture == "LlamaDecoderLayer"
    assert (config.layernorms, config.fusion_bias) == (False, False)
    assert recorded(model).algorithm == "eagle"
    proposal = recorded(model).default_proposal()
    assert isinstance(proposal, GreedyTokenProposalConfig) and proposal.speculative_tokens == 3
    assert recorded(model).verifier.name_or_path == str(tiny_verifier.resolve())
    tensors = load_file(str(tiny_verifier / "model.safetensors"))
    assert torch.equal(model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion_fc.weight", *LAYER_TENSORS}
    assert model.hidden_state_spec() == HiddenStateSpec(layer_ids=(4,), post_norm_last=True)
    assert (
        EagleDraftModel.hidden_state_spec_for_verifier(tiny_verifier) == model.hidden_state_spec()
    )


def test_tied_qwen3_verifier_shares_its_embedding_as_lm_head(tiny_qwen3_verifier: Path) -> None:
    """A verifier with tied embeddings (no lm_head tensor) gives its embedding as the LM head."""
    model = EagleDraftModel.from_verifier(tiny_qwen3_verifier)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert model.config.layer_config.hidden_size == 32
    layers = json.loads((tiny_qwen3_verifier / "config.json").read_text())["num_hidden_layers"]
    assert model.hidden_state_spec().layer_ids == (layers,)  # its final post-norm state


def test_saved_format(tiny_verifier: Path, tmp_path: Path) -> None:
    """config.json and tensor names/shapes are FORMAT.md 1.3's; verifier tensors are not saved."""
    model = EagleDraftModel.from_verifier(tiny_verifier, speculative_tokens=4)
    model.save_pretrained(tmp_path / "draft")
    assert sorted(p.name for p in (tmp_path / "draft").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert saved_shapes(tmp_path / "draft") == {"fusion_fc.weight": (64, 128), **LAYER_TENSORS}
    data = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert "model_type" not in data
    assert data["speculators_model_type"] == "eagle"
    assert data["transformer_layer_architecture"] == "LlamaDecoderLayer"
    assert data["layernorms"] is False and data["fusion_bias"] is False
    assert data["feature_norm_before_fc"] is False  # always written
    layer = data["transformer_layer_config"]
    assert layer["model_type"] == "llama"
    assert layer["vocab_size"] == 259 and layer["num_hidden_layers"] == 1
    assert layer["tie_word_embeddings"] is False
    spec = data["speculators_config"]
    assert spec["algorithm"] == "eagle" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4
    assert spec["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert list(data) == sorted(data)


def test_layernorms_and_fusion_bias_tensors(tiny_verifier: Path, tmp_path: Path) -> None:
    """With layernorms and fusion_bias the extra tensors of FORMAT.md 1.3 are saved."""
    model = EagleDraftModel.from_verifier(tiny_verifier, layernorms=True, fusion_bias=True)
    model.save_pretrained(tmp_path / "draft")
    assert saved_shapes(tmp_path / "draft") == {
        "fusion_fc.weight": (64, 128),
        "fusion_fc.bias": (64,),
        "embedding_layernorm.weight": (64,),
        "pre_lm_head_layernorm.weight": (64,),
        "transformer.input_layernorm.weight": (64,),
        **LAYER_TENSORS,
    }


def test_feature_norm_before_fc_tensors_and_round_trip(tiny_verifier: Path, tmp_path: Path) -> None:
    """feature_norm_before_fc saves feature_layernorm instead of the layer's input norm."""
    model = EagleDraftModel.from_verifier(
        tiny_verifier, layernorms=True, feature_norm_before_fc=True
    )
    perturb(model, seed=2)
    model.save_pretrained(tmp_path / "draft")
    assert saved_shapes(tmp_path / "draft") == {
        "fusion_fc.weight": (64, 128),
        "embedding_layernorm.weight": (64,),
        "feature_layernorm.weight": (64,),
        "pre_lm_head_layernorm.weight": (64,),
        **LAYER_TENSORS,
    }
    data = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert data["layernorms"] is True and data["feature_norm_before_fc"] is True
    again = load_speculator(tmp_path / "draft", verifier=tiny_verifier)
    assert isinstance(again, EagleDraftModel) and again.config.feature_norm_before_fc is True
    assert isinstance(again.transformer.input_layernorm, torch.nn.Identity)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def research_forward(
    sd: dict[str, torch.Tensor],
    layer: Any,
    tokens: torch.Tensor,  # [L] (x_{t+1} at index t)
    features: torch.Tensor,  # [L, H] (f_t at index t)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculators research HASS forward, written out in float64 from the state dict.

    ``e = embed_layernorm(Embed(x))``, ``f' = hidden_layernorm(f)``, ``h = fc([e, f'])``, one
    Llama layer with no input norm (residual = ``h``), causal GQA attention with RoPE at
    positions 0.., ``logits = lm_head(lm_head_layernorm(out))``. Returns (out ``[L, H]``,
    logits ``[L, V]``).
    """
    w = {name: t.double() for name, t in sd.items()}
    eps, dim = layer.rms_norm_eps, layer.head_dim
    heads, kv_heads = layer.num_attention_heads, layer.num_key_value_heads
    theta = layer.rope_parameters["rope_theta"]
    length = tokens.shape[0]
    e = _rms(w["embed_tokens.weight"][tokens], w["embedding_layernorm.weight"], eps)
    f = _rms(features.double(), w["feature_layernorm.weight"], eps)
    h = torch.cat([e, f], dim=-1) @ w["fusion_fc.weight"].T  # [L, H]
    q = (h @ w["transformer.self_attn.q_proj.weight"].T).view(length, heads, dim)
    k = (h @ w["transformer.self_attn.k_proj.weight"].T).view(length, kv_heads, dim)
    v = (h @ w["transformer.self_attn.v_proj.weight"].T).view(length, kv_heads, dim)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]  # [L, d/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    out = torch.zeros(length, heads, dim, dtype=torch.float64)
    for i in range(length):
        for head in range(heads):
            kv = head // (heads // kv_heads)
            qi = q[i, head]
            qi = torch.cat(
                [
                    qi[: dim // 2] * cos[i, 0] - qi[dim // 2 :] * sin[i, 0],
                    qi[dim // 2 :] * cos[i, 0] + qi[: dim // 2] * sin[i, 0],
                ]
            )
            scores = []
            for j in range(i + 1):  # causal
                kj = k[j, kv]
                kj = torch.cat(
                    [
                        kj[: dim // 2] * cos[j, 0] - kj[dim // 2 :] * sin[j, 0],
                        kj[dim // 2 :] * cos[j, 0] + kj[: dim // 2] * sin[j, 0],
                    ]
                )
                scores.append(qi @ kj / dim**0.5)
            probs = torch.softmax(torch.stack(scores), dim=0)
            out[i, head] = sum(p * v[j, kv] for j, p in enumerate(probs))
    h = h + out.reshape(length, heads * dim) @ w["transformer.self_attn.o_proj.weight"].T
    normed = _rms(h, w["transformer.post_attention_layernorm.weight"], eps)
    gate = normed @ w["transformer.mlp.gate_proj.weight"].T
    up = normed @ w["transformer.mlp.up_proj.weight"].T
    h = h + (torch.nn.functional.silu(gate) * up) @ w["transformer.mlp.down_proj.weight"].T
    logits = _rms(h, w["pre_lm_head_layernorm.weight"], eps) @ w["lm_head.weight"].T
    return h, logits


def test_feature_norm_before_fc_equals_the_research_forward(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """One step and a fed-back step equal the research forward written out in the test.

    Drafting one own step after a true context ending at ``c`` is the plain forward over a
    sequence whose feature at ``c + 1`` is the prediction at ``c``: the fed-back feature goes
    through the feature norm too.
    """
    model = EagleDraftModel.from_verifier(
        tiny_verifier, layernorms=True, feature_norm_before_fc=True
    ).eval()
    perturb(model, seed=5)
    sample = random_samples(verifier_model, [10], seed=6)[0]
    ids, features = sample["input_ids"], sample["hidden_states"][:, 0]  # [L], [L, H]
    tokens, feats = ids[1:], features[:-1]  # x_{t+1} and f_t at index t
    layer, sd = model.config.layer_config, model.state_dict()
    expected, expected_logits = research_forward(sd, layer, tokens, feats)
    length = tokens.shape[0]
    with torch.no_grad():
        got = model.decode(
            tokens[None],
            feats[None],
            torch.arange(length)[None],
            cache=KVCache(1),
            mask=torch.ones(length, length, dtype=torch.bool).tril()[None, None],
            implementation="eager",
        )[0]
        logits = model.head(got)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.double(), expected_logits, rtol=1e-4, atol=1e-4)
    # The norm matters: without it the output differs.
    plain = dict(sd, **{"feature_layernorm.weight": torch.ones(64)})
    assert not torch.allclose(research_forward(plain, layer, tokens, feats)[0], expected)
    context_end = 5
    fed_back = feats.clone()
    fed_back[context_end + 1] = expected[context_end].float()
    own, _ = research_forward(sd, layer, tokens, fed_back)
    drafted = draft_from_scratch(
        model, ids, features, torch.arange(ids.shape[0]), context_end, own_steps=1
    )
    torch.testing.assert_close(drafted.double(), own[context_end + 1], rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_weights_and_outputs(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    """Saved and reloaded (with the verifier), the draft computes the same training step."""
    model = EagleDraftModel.from_verifier(tiny_verifier, fusion_bias=True).eval()
    perturb(model, seed=1)
    model.save_pretrained(tmp_path / "draft")
    again = load_speculator(tmp_path / "draft", verifier=tiny_verifier).eval()
    assert type(again) is EagleDraftModel
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    batch = pack(random_samples(verifier_model, [10, 7], seed=4), 20)
    assert again.training_step(batch).loss.item() == model.training_step(batch).loss.item()
    config = load_config(tmp_path / "draft")
    assert isinstance(config, EagleSpeculatorConfig) and config.fusion_bias is True


def test_loaded_without_verifier_refuses_to_train(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    """Without the verifier, the missing embedding/LM head are NaN and training says so."""
    EagleDraftModel.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    bare = load_speculator(tmp_path / "draft")
    assert torch.isnan(bare.lm_head.weight).all()
    batch = pack(random_samples(verifier_model, [6], seed=4), 6)
    with pytest.raises(SpeculatorsError, match="attach_verifier_parts"):
        bare.training_step(batch)
    bare.attach_verifier_parts(tiny_verifier)
    assert torch.isfinite(bare.training_step(batch).loss)


def test_init_from_a_previous_stage(tiny_verifier: Path, tmp_path: Path) -> None:
    """init_from starts from a saved eagle folder's weights; training options are new."""
    first = EagleDraftModel.from_verifier(tiny_verifier, fusion_bias=True, topk_w=0.0)
    perturb(first, seed=3)
    first.save_pretrained(tmp_path / "stage1")
    second = EagleDraftModel.from_verifier(
        tiny_verifier,
        fusion_bias=True,
        topk_w=1.0,
        init_from=tmp_path / "stage1",
        verifier_name_or_path="org/verifier",
    )
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    assert second.loss_weights.topk_w == 1.0
    assert recorded(second).verifier.name_or_path == "org/verifier"
    with pytest.raises(SpeculatorsError, match="fusion_bias=true but fusion_bias=false"):
        EagleDraftModel.from_verifier(tiny_verifier, init_from=tmp_path / "stage1")
    research = EagleDraftModel.from_verifier(
        tiny_verifier, layernorms=True, feature_norm_before_fc=True
    )
    research.save_pretrained(tmp_path / "research")
    with pytest.raises(SpeculatorsError, match="feature_norm_before_fc=true but"):
        EagleDraftModel.from_verifier(
            tiny_verifier, layernorms=True, init_from=tmp_path / "research"
        )


def test_configure_training(tiny_verifier: Path) -> None:
    """Training options are set and checked."""
    model = EagleDraftModel.from_verifier(tiny_verifier, hass_steps=2, topk=5, noise_std=0.0)
    assert model.hass_steps == 2 and model.loss_weights.topk == 5 and model.noise_std == 0.0
    model.configure_training(v_w=0.5, p_w=0.2, topk_w=0.0, attn_implementation="eager")
    weights = model.loss_weights
    assert (weights.v_w, weights.p_w, weights.topk_w, weights.topk) == (0.5, 0.2, 0.0, 5)
    assert model.attn_implementation == "eager"
    for bad, match in (
        ({"hass_steps": 0}, "hass_steps must be at least 1"),
        ({"noise_std": -1.0}, "noise_std must be >= 0"),
        ({"attn_implementation": "flex"}, "unknown attention implementation 'flex'"),
        ({"p_w": -0.1}, "p_w must be >= 0"),
    ):
        with pytest.raises(SpeculatorsError, match=match) as err:
            model.configure_training(**bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_layers": 2}, "exactly one decoder layer"),
        ({"draft_vocab_size": 100}, "draft_vocab_size=100"),
        ({"token_counts": {1: 3}}, "full vocabulary"),
        ({"speculative_tokens": 0}, "speculative_tokens must be at least 1"),
        ({"ttt_steps": 3}, "unknown eagle option"),
        ({"feature_norm_before_fc": True}, "needs layernorms=true"),
    ],
)
def test_from_verifier_refuses_bad_options(
    tiny_verifier: Path, options: dict[str, Any], match: str
) -> None:
    """Options an EAGLE-1 draft cannot honour are one-line errors."""
    with pytest.raises(SpeculatorsError, match=match) as err:
        EagleDraftModel.from_verifier(tiny_verifier, **options)
    assert "\n" not in str(err.value)


def test_full_vocabulary_options_are_accepted(tiny_verifier: Path) -> None:
    """num_layers=1 and draft_vocab_size equal to the verifier's are what the draft is anyway."""
    model = EagleDraftModel.from_verifier(tiny_verifier, num_layers=1, draft_vocab_size=259)
    assert model.config.verifier_vocab_size == 259


def test_attach_refuses_another_verifier(tiny_verifier: Path, tiny_qwen3_verifier: Path) -> None:
    """Attaching a verifier of another size is refused."""
    model = EagleDraftModel.from_verifier(tiny_verifier)
    with pytest.raises(SpeculatorsError, match="hidden size 32"):
        model.attach_verifier_parts(tiny_qwen3_verifier)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"transformer_layer_architecture": "Qwen3DecoderLayer"}, "eagle drafts use one of"),
        ({"transformer_layer_config": {"model_type": "qwen3"}}, "does not match"),
        ({"transformer_layer_config": [1, 2]}, "transformer_layer_config"),
        (
            {"feature_norm_before_fc": True, "layernorms": False},
            "feature_norm_before_fc is true but layernorms is false",
        ),
    ],
)
def test_config_validation(tiny_verifier: Path, change: dict[str, Any], match: str) -> None:
    """Malformed eagle configs are one-line ConfigErrors."""
    data = EagleDraftModel.from_verifier(tiny_verifier).config.to_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(data)
    assert "\n" not in str(err.value)


def test_auto_architecture_is_resolved() -> None:
    """'auto' (the field default) is saved resolved, as upstream does."""
    config = EagleSpeculatorConfig(
        transformer_layer_config={"model_type": "llama", "num_hidden_layers": 1}
    )
    assert config.transformer_layer_architecture == "LlamaDecoderLayer"
    assert config.to_dict()["transformer_layer_architecture"] == "LlamaDecoderLayer"


def test_training_batch_shape_is_checked(tiny_verifier: Path) -> None:
    """A batch with the wrong hidden-state layout names the expected shape."""
    model = EagleDraftModel.from_verifier(tiny_verifier)
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "hidden_states": torch.zeros(1, 4, 2, 64),
        "loss_mask": torch.ones(1, 4, dtype=torch.long),
        "position_ids": torch.arange(4)[None],
        "document_ids": torch.zeros(1, 4, dtype=torch.long),
    }
    with pytest.raises(SpeculatorsError, match=r"expected \[B, T, 1, 64\]"):
        model.training_step(batch)
    with pytest.raises(SpeculatorsError, match="lacks document_ids"):
        model.training_step({k: v for k, v in batch.items() if k != "document_ids"})


def test_reads_an_upstream_style_folder(tiny_verifier: Path, tmp_path: Path) -> None:
    """A folder as upstream's EagleSpeculator (v0.1 - v0.4) writes it loads and computes.

    Written here by hand from FORMAT.md 1.1 - 1.3: auto_map to a copied eagle.py,
    ``torch_dtype`` (transformers 4), ``has_no_defaults_at_init``, the verifier's whole config
    as ``transformer_layer_config`` (upstream's trainer left its layer count there; rope given as
    ``rope_theta``), a HASS fusion bias, and tensors without embedding and LM head.
    """
    folder = tmp_path / "upstream"
    folder.mkdir()
    verifier = json.loads((tiny_verifier / "config.json").read_text())
    layer = {
        key: verifier[key]
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "rms_norm_eps",
        )
    }
    layer.update(
        model_type="llama",
        num_hidden_layers=4,
        rope_theta=verifier["rope_parameters"]["rope_theta"],
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    config = {
        "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
        "auto_map": {"": "eagle.EagleSpeculatorConfig"},
        "fusion_bias": True,
        "has_no_defaults_at_init": False,
        "layernorms": False,
        "speculators_config": {
            "algorithm": "eagle",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "accept_tolerance": 0.0,
                    "proposal_type": "greedy",
                    "speculative_tokens": 5,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": "org/model"},
        },
        "speculators_model_type": "eagle",
        "speculators_version": "0.1.0.dev21",
        "torch_dtype": "float32",
        "transformer_layer_architecture": "LlamaDecoderLayer",
        "transformer_layer_config": layer,
        "transformers_version": "4.53.2",
    }
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    shapes = {"fusion_fc.weight": (64, 128), "fusion_fc.bias": (64,), **LAYER_TENSORS}
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    model = load_speculator(folder, verifier=tiny_verifier)
    assert type(model) is EagleDraftModel
    assert model.config.fusion_bias is True
    assert (
        model.config.layer_config.rope_parameters["rope_theta"]
        == verifier["rope_parameters"]["rope_theta"]
    )
    for name, tensor in tensors.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    model.save_pretrained(tmp_path / "again")
    data = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "auto_map" not in data and "torch_dtype" not in data and "model_type" not in data
    assert saved_shapes(tmp_path / "again") == shapes
