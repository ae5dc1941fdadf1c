"""Building an EAGLE-3 draft from a verifier, its saved format, and loading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speculators_eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig, default_aux_layer_ids
from speculators_eagle3.alignment import align_batch

from speculators_core import (
    ConfigError,
    GreedyTokenProposalConfig,
    HiddenStateSpec,
    SpeculatorsConfig,
    SpeculatorsError,
    build_vocab_mapping,
    load_config,
    load_speculator,
)
from speculators_core.testing import make_tiny_verifier

COUNTS = {i: (i * 37) % 101 for i in range(259)}


def recorded(model: Eagle3DraftModel) -> SpeculatorsConfig:
    """The model's ``speculators_config`` (always the pydantic object after construction)."""
    spec = model.config.speculators_config
    assert isinstance(spec, SpeculatorsConfig)
    return spec


def speculative_tokens(model: Eagle3DraftModel) -> int:
    proposal = recorded(model).default_proposal()
    assert isinstance(proposal, GreedyTokenProposalConfig)
    return proposal.speculative_tokens


def mapping(model: Eagle3DraftModel) -> tuple[torch.Tensor, torch.Tensor]:
    assert model.d2t is not None and model.t2d is not None
    return model.d2t, model.t2d


def verifier_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


# ------------------------------------------------------------------ construction


def test_from_verifier_copies_sizes_rope_and_verifier_rows(tiny_verifier: Path) -> None:
    """Sizes, RoPE and vocab come from the verifier; frozen parts are its rows."""
    model = Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=100, token_counts=COUNTS
    )
    config = model.config
    verifier = json.loads((tiny_verifier / "config.json").read_text())
    layer = config.layer_config
    assert layer.model_type == "llama" and layer.num_hidden_layers == 1
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(layer, key) == verifier[key]
    assert layer.vocab_size == verifier["vocab_size"] == 259
    assert layer.rope_parameters["rope_theta"] == verifier["rope_parameters"]["rope_theta"]
    assert config.draft_vocab_size == 100
    assert config.eagle_aux_hidden_state_layer_ids == AUX_IDS
    assert config.norm_before_residual is True
    assert speculative_tokens(model) == 3
    assert recorded(model).verifier.name_or_path == str(tiny_verifier.resolve())
    assert recorded(model).verifier.architectures == ["LlamaForCausalLM"]

    d2t, t2d = build_vocab_mapping(COUNTS, 100, 259)
    assert torch.equal(mapping(model)[0], d2t) and torch.equal(mapping(model)[1], t2d)
    weights = verifier_tensors(tiny_verifier)
    chosen = torch.arange(100) + d2t
    assert torch.equal(model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"][chosen])
    assert torch.equal(model.verifier_lm_head.weight, weights["lm_head.weight"][t2d])
    assert torch.equal(model.verifier_norm.weight, weights["model.norm.weight"])
    assert model.hidden_state_spec() == HiddenStateSpec(layer_ids=(1, 2, 3, 4))


def test_trainable_parameters(tiny_verifier: Path) -> None:
    """fc, the layers and the final norm train; verifier copies stay frozen unless asked."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "fc.weight" in trainable and "norm.weight" in trainable
    assert "layers.0.self_attn.q_proj.weight" in trainable
    assert not trainable & {
        "embed_tokens.weight",
        "lm_head.weight",
        "verifier_lm_head.weight",
        "verifier_norm.weight",
    }
    other = Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, embed_requires_grad=True, train_lm_head=True
    )
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert {"embed_tokens.weight", "lm_head.weight"} <= trainable
    assert "verifier_lm_head.weight" not in trainable


def test_default_aux_ids_and_options(tmp_path: Path) -> None:
    """Default aux ids are [2, N//2, N-3]; options reach the config and the training settings."""
    verifier = make_tiny_verifier(tmp_path / "v8", num_layers=8, hidden_size=32)
    model = Eagle3DraftModel.from_verifier(
        verifier,
        num_layers=2,
        layer_type="qwen3",
        norm_before_residual=False,
        norm_before_fc=True,
        norm_output=True,
        ttt_steps=5,
        ttt_step_loss_decay=0.8,
        noise_std=0.0,
        speculative_tokens=2,
        verifier_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert default_aux_layer_ids(8) == [2, 4, 5]
    assert model.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    assert model.hidden_state_spec().layer_ids == (2, 4, 5, 8)
    assert model.config.layer_config.model_type == "qwen3"
    assert model.config.layer_config.num_hidden_layers == 2
    assert model.config.draft_vocab_size == model.config.verifier_vocab_size
    assert model.d2t is None and model.t2d is None
    assert (model.ttt_steps, model.ttt_step_loss_decay, model.noise_std) == (5, 0.8, 0.0)
    assert speculative_tokens(model) == 2
    verifier_record = recorded(model).verifier
    assert verifier_record.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    names = dict(model.named_parameters())
    assert names["layers.1.self_attn.q_norm.weight"].shape == (8,)
    assert names["layers.0.self_attn.q_proj.weight"].shape == (32, 64)  # 2H inputs
    assert names["layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert names["input_norm.weight"].shape == (96,)


def test_tied_qwen3_verifier_uses_embeddings_as_head(tiny_qwen3_verifier: Path) -> None:
    """A verifier without lm_head.weight (tied) gives the embedding rows as LM head."""
    model = Eagle3DraftModel.from_verifier(
        tiny_qwen3_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=50, token_counts=COUNTS
    )
    weights = verifier_tensors(tiny_qwen3_verifier)
    assert "lm_head.weight" not in weights
    assert torch.equal(
        model.verifier_lm_head.weight, weights["model.embed_tokens.weight"][model.t2d]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aux_layer_ids": [1, 1, 2]}, r"aux_layer_ids \[1, 1, 2\] must be distinct"),
        ({"aux_layer_ids": [1, 2, 9]}, r"must be distinct ids in 0..4"),
        ({}, r"the default aux layer ids \[2, 2, 1\]"),
        ({"aux_layer_ids": AUX_IDS, "draft_vocab_size": 100}, "needs token_counts"),
        ({"aux_layer_ids": AUX_IDS, "draft_vocab_size": 999, "token_counts": COUNTS}, "between 1"),
        ({"aux_layer_ids": AUX_IDS, "layer_type": "mistral"}, "layer_type 'mistral'"),
        ({"aux_layer_ids": AUX_IDS, "bogus": 1}, "unknown eagle3 option"),
        ({"aux_layer_ids": AUX_IDS, "num_layers": 0}, "num_layers must be at least 1"),
        ({"aux_layer_ids": AUX_IDS, "ttt_steps": 0}, "ttt_steps must be at least 1"),
        ({"aux_layer_ids": AUX_IDS, "fc_norm": True, "norm_before_fc": True}, "mutually exclusive"),
        ({"aux_layer_ids": AUX_IDS, "attn_implementation": "flash"}, "unknown attention"),
    ],
)
def test_from_verifier_errors(tiny_verifier: Path, options: dict, message: str) -> None:
    """Bad options are one-line errors naming the value and the fix."""
    with pytest.raises(SpeculatorsError, match=message) as err:
        Eagle3DraftModel.from_verifier(tiny_verifier, **options)
    assert "\n" not in str(err.value)


def test_explicit_vocab_mapping(tiny_verifier: Path) -> None:
    """d2t/t2d can be passed instead of counts; a bad pair is refused."""
    d2t, t2d = build_vocab_mapping({5: 3, 9: 2, 200: 1}, 10, 259)
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, d2t=d2t, t2d=t2d)
    assert model.config.draft_vocab_size == 10 and torch.equal(mapping(model)[0], d2t)
    with pytest.raises(SpeculatorsError, match="pass d2t and t2d together"):
        Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, d2t=d2t)
    with pytest.raises(SpeculatorsError, match="t2d has 100 entries"):
        Eagle3DraftModel.from_verifier(
            tiny_verifier,
            aux_layer_ids=AUX_IDS,
            d2t=d2t[:5],
            t2d=build_vocab_mapping({}, 5, 100)[1],
        )


# ------------------------------------------------------------------ format


def test_saved_folder_is_the_speculators_eagle3_format(tiny_verifier: Path, tmp_path: Path) -> None:
    """Tensor names, dtypes and config.json follow FORMAT.md 1.4 and checklist 2.9."""
    model = Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=100, token_counts=COUNTS
    )
    out = tmp_path / "draft"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tensors = saved_tensors(out)
    expected = {
        "embed_tokens.weight": (259, 64),
        "fc.weight": (64, 192),
        "layers.0.input_layernorm.weight": (64,),
        "layers.0.hidden_norm.weight": (64,),
        "layers.0.post_attention_layernorm.weight": (64,),
        "layers.0.self_attn.q_proj.weight": (64, 128),
        "layers.0.self_attn.k_proj.weight": (32, 128),
        "layers.0.self_attn.v_proj.weight": (32, 128),
        "layers.0.self_attn.o_proj.weight": (64, 64),
        "layers.0.mlp.gate_proj.weight": (128, 64),
        "layers.0.mlp.up_proj.weight": (128, 64),
        "layers.0.mlp.down_proj.weight": (64, 128),
        "norm.weight": (64,),
        "lm_head.weight": (100, 64),
        "d2t": (100,),
        "t2d": (259,),
    }
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert int(tensors["t2d"].sum()) == 100

    config = json.loads((out / "config.json").read_text())
    assert "model_type" not in config
    assert config["speculators_model_type"] == "eagle3"
    assert config["architectures"] == ["Eagle3DraftModel"]
    assert config["norm_before_residual"] is True
    assert config["eagle_aux_hidden_state_layer_ids"] == AUX_IDS
    assert config["draft_vocab_size"] == 100
    for key in ("norm_before_fc", "fc_norm", "norm_output", "embed_requires_grad"):
        assert config[key] is False
    assert config["target_hidden_size"] is None
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["vocab_size"] == 259
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
    ):
        assert key in layer
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"]["name_or_path"] and spec["verifier"]["architectures"]


def test_full_vocab_draft_has_no_mapping_tensors(tiny_verifier: Path, tmp_path: Path) -> None:
    """Without a reduced vocabulary no d2t/t2d are written."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, fc_norm=True)
    model.save_pretrained(tmp_path / "d")
    tensors = saved_tensors(tmp_path / "d")
    assert "d2t" not in tensors and "t2d" not in tensors
    assert tensors["lm_head.weight"].shape == (259, 64)
    assert {n for n in tensors if n.startswith("fc_norm")} == {
        f"fc_norm.{i}.weight" for i in range(3)
    }


@pytest.mark.parametrize(
    "options",
    [
        {"draft_vocab_size": 100, "token_counts": COUNTS},
        {"layer_type": "qwen3", "num_layers": 2, "norm_before_fc": True, "norm_output": True},
    ],
)
def test_round_trip_through_the_plugin_host(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path, options: dict
) -> None:
    """SpeculatorModel.from_pretrained finds the plugin and gives identical tensors and logits."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, **options)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(tmp_path / "draft")
    loaded = load_speculator(tmp_path / "draft", verifier=tiny_verifier).eval()
    assert type(loaded) is Eagle3DraftModel
    assert type(load_config(tmp_path / "draft")) is Eagle3SpeculatorConfig
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
        assert original[name].dtype == again[name].dtype
    batch = pack_rows(random_samples(verifier_model, [*AUX_IDS, 4], [9, 6], seed=1), 16)
    aligned = align_batch(**batch)
    inputs = (
        aligned.aux_hidden_states,
        aligned.input_ids,
        aligned.document_ids,
        aligned.position_ids,
    )
    for a, b in zip(model.ttt_forward(*inputs), loaded.ttt_forward(*inputs), strict=True):
        assert torch.equal(a, b)
    assert model.training_step(batch).loss.item() == loaded.training_step(batch).loss.item()


def test_loading_without_verifier(tiny_verifier: Path, verifier_model: Any, tmp_path: Path) -> None:
    """Without the verifier a draft drafts, but training asks for the verifier parts."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS)
    model.save_pretrained(tmp_path / "draft")
    loaded = load_speculator(tmp_path / "draft")
    batch = pack_rows(random_samples(verifier_model, [*AUX_IDS, 4], [6], seed=2), 6)
    with pytest.raises(SpeculatorsError, match=r"attach_verifier_parts\(verifier_folder\)"):
        loaded.training_step(batch)
    # The recorded verifier path is a local folder: the spec can be read from it.
    assert loaded.hidden_state_spec().layer_ids == (1, 2, 3, 4)
    loaded.attach_verifier_parts(tiny_verifier)
    assert torch.isfinite(loaded.training_step(batch).loss)


def test_checkpoint_without_embedding_or_t2d(tiny_verifier: Path, tmp_path: Path) -> None:
    """Converter-style files without embed_tokens/t2d load; the verifier fills them in."""
    model = Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=100, token_counts=COUNTS
    )
    model.save_pretrained(tmp_path / "draft")
    file = tmp_path / "draft" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["embed_tokens.weight"], tensors["t2d"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    loaded = load_speculator(tmp_path / "draft")
    loaded.save_pretrained(tmp_path / "again")  # t2d is re-derived from d2t on save
    assert torch.equal(saved_tensors(tmp_path / "again")["t2d"], mapping(model)[1])
    loaded.attach_verifier_parts(tiny_verifier)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert torch.equal(loaded.t2d, mapping(model)[1])


def test_attach_refuses_another_verifier(tiny_verifier: Path, tiny_qwen3_verifier: Path) -> None:
    """Attaching a verifier of other sizes is a one-line error."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS)
    with pytest.raises(SpeculatorsError, match="pass the verifier the draft was trained for"):
        model.attach_verifier_parts(tiny_qwen3_verifier)


def test_training_batch_errors(tiny_verifier: Path) -> None:
    """A batch without a key or with the wrong number of states is refused clearly."""
    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS)
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "hidden_states": torch.zeros(1, 4, 3, 64),
        "loss_mask": torch.ones(1, 4, dtype=torch.long),
        "position_ids": torch.arange(4)[None],
        "document_ids": torch.zeros(1, 4, dtype=torch.long),
    }
    with pytest.raises(SpeculatorsError, match=r"expected \[B, T, 4, Ht\]"):
        model.training_step(batch)
    del batch["document_ids"]
    with pytest.raises(SpeculatorsError, match="lacks document_ids"):
        model.training_step(batch)


# ------------------------------------------------------------------ config


def test_config_from_dict_and_errors() -> None:
    """A dict layer config becomes a transformers config; inconsistent flags are refused."""
    layer = {
        "model_type": "qwen3",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 50,
    }
    config = Eagle3SpeculatorConfig(transformer_layer_config=layer, draft_vocab_size=50)
    assert type(config.layer_config).__name__ == "Qwen3Config"
    assert config.to_dict()["transformer_layer_config"]["model_type"] == "qwen3"
    no_type = Eagle3SpeculatorConfig(
        transformer_layer_config={"hidden_size": 32, "vocab_size": 50}, draft_vocab_size=50
    )
    assert no_type.layer_config.model_type == "llama"
    with pytest.raises(ConfigError, match="mutually exclusive"):
        Eagle3SpeculatorConfig(
            transformer_layer_config=layer, draft_vocab_size=50, fc_norm=True, norm_before_fc=True
        )
    with pytest.raises(ConfigError, match="model_type is 'mistral'"):
        Eagle3SpeculatorConfig(
            transformer_layer_config={**layer, "model_type": "mistral"}, draft_vocab_size=50
        )
    with pytest.raises(ConfigError, match="draft_vocab_size 60"):
        Eagle3SpeculatorConfig(transformer_layer_config=layer, draft_vocab_size=60)
    with pytest.raises(ConfigError, match=r"eagle_aux_hidden_state_layer_ids \[1, 1\]"):
        Eagle3SpeculatorConfig(
            transformer_layer_config=layer,
            draft_vocab_size=50,
            eagle_aux_hidden_state_layer_ids=[1, 1],
        )


def test_spec_for_verifier_matches_a_built_draft(tmp_path):
    """The cheap classmethod (no model built) gives the same spec as a fresh draft."""
    from speculators_eagle3 import Eagle3DraftModel

    from speculators_core.testing import make_tiny_verifier

    verifier = make_tiny_verifier(tmp_path / "v", num_layers=8)
    for options in ({}, {"aux_layer_ids": [1, 3, 6]}):
        built = Eagle3DraftModel.from_verifier(verifier, **options).hidden_state_spec()
        assert Eagle3DraftModel.hidden_state_spec_for_verifier(verifier, **options) == built
    assert Eagle3DraftModel.hidden_state_spec_for_verifier(verifier).layer_ids == (2, 4, 5, 8)


def test_init_from_an_earlier_run(tiny_verifier: Path, tmp_path: Path) -> None:
    """init_from starts from a saved draft's weights; training options are the new ones."""
    options: dict[str, Any] = {
        "aux_layer_ids": AUX_IDS,
        "draft_vocab_size": 100,
        "token_counts": COUNTS,
    }
    first = Eagle3DraftModel.from_verifier(tiny_verifier, ttt_steps=2, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in first.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    first.save_pretrained(tmp_path / "stage1")
    second = Eagle3DraftModel.from_verifier(
        tiny_verifier, ttt_steps=3, noise_std=0.0, init_from=tmp_path / "stage1", **options
    )
    trained = [name for name, p in first.named_parameters() if p.requires_grad]
    assert trained
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    assert second.ttt_steps == 3 and second.noise_std == 0.0
    fresh = Eagle3DraftModel.from_verifier(tiny_verifier, **options)
    assert not torch.equal(fresh.fc.weight, second.fc.weight)

    normed = _saved(tiny_verifier, tmp_path / "normed", options)
    with pytest.raises(SpeculatorsError, match="norm_output=True but norm_output=False"):
        Eagle3DraftModel.from_verifier(tiny_verifier, init_from=normed, **options)
    with pytest.raises(SpeculatorsError, match="another architecture"):
        Eagle3DraftModel.from_verifier(
            tiny_verifier, init_from=tmp_path / "stage1", num_layers=2, **options
        )
    other_counts = {i: (i * 53) % 97 for i in range(259)}
    with pytest.raises(SpeculatorsError, match="another draft vocabulary"):
        Eagle3DraftModel.from_verifier(
            tiny_verifier,
            init_from=tmp_path / "stage1",
            aux_layer_ids=AUX_IDS,
            draft_vocab_size=100,
            token_counts=other_counts,
        )
    with pytest.raises(SpeculatorsError, match="cannot be loaded"):
        Eagle3DraftModel.from_verifier(tiny_verifier, init_from=tmp_path / "absent", **options)


def _saved(verifier: Path, folder: Path, options: dict[str, Any]) -> Path:
    """A draft with ``norm_output`` on, saved to ``folder``."""
    Eagle3DraftModel.from_verifier(verifier, norm_output=True, **options).save_pretrained(folder)
    return folder
