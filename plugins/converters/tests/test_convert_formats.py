"""Every source layout converts, is detected, reloads through SpeculatorModel and validates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from converter_helpers import (
    FILE_KINDS,
    make_safeailab_eagle,
    make_safeailab_eagle3,
    make_speculators_eagle,
    make_speculators_eagle3,
    make_zlab_dflash,
)
from safetensors.torch import load_file
from speculators_dflash import DFlashDraftModel
from speculators_eagle3 import Eagle3DraftModel
from speculators_hass import EagleDraftModel

from speculators_core import get_host, load_speculator
from speculators_core.cli.convert import detect_format
from speculators_core.conversion import run_conversion


def _eagle1_name(name: str) -> str | None:
    """Where FORMAT.md 4.2 puts a SafeAILab EAGLE-1 tensor (None: dropped)."""
    if name.startswith("fc."):
        return "fusion_fc." + name[3:]
    if name.startswith("layers.0."):
        return "transformer." + name[len("layers.0.") :]
    return None


def _research_name(name: str) -> str | None:
    """Where the research HASS norms go (``feature_norm_before_fc``); the rest as EAGLE-1."""
    norms = {
        "embed_layernorm.weight": "embedding_layernorm.weight",
        "hidden_layernorm.weight": "feature_layernorm.weight",
        "lm_head_layernorm.weight": "pre_lm_head_layernorm.weight",
    }
    return norms.get(name) or _eagle1_name(name)


def _eagle3_name(name: str) -> str | None:
    """Where FORMAT.md 4.3 puts a SafeAILab EAGLE-3 tensor."""
    return "layers.0." + name[len("midlayer.") :] if name.startswith("midlayer.") else name


LAYOUTS: dict[
    str,
    tuple[
        Callable[..., dict[str, torch.Tensor]],
        dict[str, Any],
        str,
        type,
        Callable[[str], str | None],
    ],
] = {
    "eagle1": (make_safeailab_eagle, {}, "safeailab-eagle", EagleDraftModel, _eagle1_name),
    "eagle1-bias-no-embed": (
        make_safeailab_eagle,
        {"bias": True, "with_embed": False},
        "safeailab-eagle",
        EagleDraftModel,
        _eagle1_name,
    ),
    "hass": (
        make_safeailab_eagle,
        {"bias": True, "seed": 11},
        "safeailab-eagle",
        EagleDraftModel,
        _eagle1_name,
    ),
    "hass-research": (
        make_safeailab_eagle,
        {"research_norms": True, "seed": 12},
        "safeailab-eagle",
        EagleDraftModel,
        _research_name,
    ),
    "eagle3": (make_safeailab_eagle3, {}, "safeailab-eagle3", Eagle3DraftModel, _eagle3_name),
    "eagle3-embed-layers0": (
        make_safeailab_eagle3,
        {"with_embed": True, "midlayer": False},
        "safeailab-eagle3",
        Eagle3DraftModel,
        _eagle3_name,
    ),
    "eagle3-full-vocab": (
        make_safeailab_eagle3,
        {"draft_vocab": None},
        "safeailab-eagle3",
        Eagle3DraftModel,
        lambda n: None if n in ("d2t", "t2d") else _eagle3_name(n),
    ),
    "speculators-eagle": (
        make_speculators_eagle,
        {},
        "speculators-eagle",
        EagleDraftModel,
        lambda n: n,
    ),
    "speculators-eagle-layernorms": (
        make_speculators_eagle,
        {"layernorms": True, "fusion_bias": True},
        "speculators-eagle",
        EagleDraftModel,
        lambda n: n,
    ),
    "speculators-eagle-feature-norm": (
        make_speculators_eagle,
        {"layernorms": True, "feature_norm_before_fc": True},
        "speculators-eagle",
        EagleDraftModel,
        lambda n: n,
    ),
    "speculators-eagle3": (
        make_speculators_eagle3,
        {},
        "speculators-eagle3",
        Eagle3DraftModel,
        lambda n: n,
    ),
    "speculators-eagle3-identity-vocab": (
        make_speculators_eagle3,
        {"draft_vocab": None, "identity_mapping": True},
        "speculators-eagle3",
        Eagle3DraftModel,
        lambda n: None if n in ("d2t", "t2d") else n,
    ),
    "zlab-dflash": (make_zlab_dflash, {}, "zlab-dflash", DFlashDraftModel, lambda n: n),
    "zlab-dflash-fused-qkv-embed": (
        make_zlab_dflash,
        {"fused_qkv": True, "with_embed": True, "block_size_in_dflash_config": True},
        "zlab-dflash",
        DFlashDraftModel,
        lambda n: None if n == "embed_tokens.weight" else n,
    ),
    "zlab-dflash-sliding-window": (
        make_zlab_dflash,
        {"sliding_window": 3, "num_layers": 1, "block_size": 3},
        "zlab-dflash",
        DFlashDraftModel,
        lambda n: n,
    ),
}


def _convert(
    layout: str, tmp_path: Path, verifier: Path, **build: Any
) -> tuple[Path, dict[str, torch.Tensor]]:
    builder, kwargs, name, _, _ = LAYOUTS[layout]
    tensors = builder(tmp_path / "src", verifier, **{**kwargs, **build})
    converters = get_host().converters()
    detected = detect_format(tmp_path / "src", converters)
    assert detected.name == name
    run_conversion(
        detected, tmp_path / "src", verifier=verifier, output=tmp_path / "out", validate=True
    )
    return tmp_path / "out", tensors


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_converts_reloads_and_validates(
    layout: str, tmp_path: Path, tiny_verifier: Path
) -> None:
    """Detected, converted with validation, reloaded as the target class; tensors copied exactly."""
    out, source = _convert(layout, tmp_path, tiny_verifier)
    _, _, _, target_class, rename = LAYOUTS[layout]
    model = load_speculator(out, verifier=tiny_verifier)
    assert type(model) is target_class
    written = load_file(str(out / "model.safetensors"))
    expected = {rename(n): t for n, t in source.items() if rename(n) is not None}
    if target_class is EagleDraftModel:  # the eagle format never stores the shared embedding
        expected.pop("embed_tokens.weight", None)
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert "model_type" not in config and "auto_map" not in config
    assert config["architectures"] == [target_class.__name__]
    if target_class is Eagle3DraftModel:
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # [2, N//2, N-3], N = 8
        assert isinstance(config["norm_before_residual"], bool)
    assert list(tmp_path.glob(".out.tmp-*")) == []


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("layout", ["eagle1", "eagle3", "zlab-dflash-fused-qkv-embed"])
def test_every_file_layout_is_read(
    layout: str, kind: str, tmp_path: Path, tiny_verifier: Path
) -> None:
    """model.safetensors, pytorch_model.bin, and both sharded with an index."""
    out, source = _convert(layout, tmp_path, tiny_verifier, kind=kind)
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(
        written["fusion_fc.weight" if layout == "eagle1" else "fc.weight"], source["fc.weight"]
    )


def test_dtype_is_kept_unless_asked(tmp_path: Path, tiny_verifier: Path) -> None:
    """A bfloat16 source stays bfloat16; --dtype float32 casts floats, never d2t/t2d."""
    make_safeailab_eagle3(tmp_path / "src", tiny_verifier, dtype=torch.bfloat16)
    converter = get_host().converters()["safeailab-eagle3"]
    run_conversion(
        converter, tmp_path / "src", verifier=tiny_verifier, output=tmp_path / "kept", validate=True
    )
    kept = load_file(str(tmp_path / "kept" / "model.safetensors"))
    assert kept["fc.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["dtype"] == "bfloat16"
    run_conversion(
        converter,
        tmp_path / "src",
        verifier=tiny_verifier,
        output=tmp_path / "f32",
        dtype="float32",
        validate=True,
    )
    cast = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert cast["fc.weight"].dtype == torch.float32
    assert torch.equal(cast["fc.weight"], kept["fc.weight"].float())
    assert cast["d2t"].dtype == torch.int64 and cast["t2d"].dtype == torch.bool


def test_options_change_the_written_config(tmp_path: Path, tiny_verifier: Path) -> None:
    """Converter options land in the config; unknown options are refused."""
    from speculators_core.errors import ConversionError

    make_safeailab_eagle3(tmp_path / "src", tiny_verifier)
    converter = get_host().converters()["safeailab-eagle3"]
    run_conversion(
        converter,
        tmp_path / "src",
        verifier=tiny_verifier,
        output=tmp_path / "out",
        options={
            "eagle_aux_hidden_state_layer_ids": [1, 3, 6],
            "norm_before_residual": True,
            "speculative_tokens": 5,
        },
        validate=True,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    assert config["norm_before_residual"] is True
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    with pytest.raises(ConversionError, match="no option 'layernorms'"):
        run_conversion(
            converter,
            tmp_path / "src",
            verifier=tiny_verifier,
            output=tmp_path / "x",
            options={"layernorms": True},
        )
    assert not (tmp_path / "x").exists()


def test_legacy_eagle_num_layers_is_normalized(tmp_path: Path, tiny_verifier: Path) -> None:
    """Upstream's trainer wrote the verifier's layer count; the current format writes 1."""
    out, _ = _convert("speculators-eagle", tmp_path, tiny_verifier)
    config = json.loads((out / "config.json").read_text())
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["transformer_layer_architecture"] == "LlamaDecoderLayer"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5


def test_a_few_layer_verifier_without_recorded_ids_is_refused_with_the_fix(
    tmp_path: Path,
) -> None:
    """For a 4-layer verifier the default [2, N//2, N-3] is [2, 2, 1]; vLLM collects each layer
    once (sorted(set(ids))), so fc would read fewer states than it has: refused in one line that
    names the option to pass, and with the ids given the conversion goes through."""
    from speculators_core.errors import ConversionError
    from speculators_core.testing import make_tiny_verifier

    verifier = make_tiny_verifier(tmp_path / "v4", num_layers=4, num_heads=2, num_kv_heads=1)
    make_safeailab_eagle3(tmp_path / "src", verifier)
    converter = get_host().converters()["safeailab-eagle3"]
    with pytest.raises(ConversionError) as caught:
        run_conversion(converter, tmp_path / "src", verifier=verifier, output=tmp_path / "out")
    message = str(caught.value)
    assert "[2, 2, 1]" in message and "--set eagle_aux_hidden_state_layer_ids=" in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    run_conversion(
        converter,
        tmp_path / "src",
        verifier=verifier,
        output=tmp_path / "out",
        options={"eagle_aux_hidden_state_layer_ids": [1, 2, 3]},
        validate=True,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
