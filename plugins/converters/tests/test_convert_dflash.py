"""z-lab DFlash checkpoints: what the converted config says, what is refused, the validation's
reach, and agreement with upstream ``speculators==0.9.0``'s own DFlash converter."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import speculators_converters.dflash as zlab
import torch
from converter_helpers import make_zlab_dflash
from safetensors.torch import load_file, save_file

from speculators_core import get_host, load_speculator
from speculators_core.conversion import run_conversion
from speculators_core.errors import ConversionError

REPO = Path(__file__).resolve().parents[3]

UPSTREAM_CONVERT = """
import sys
from speculators.convert.dflash.converter import DFlashConverter
DFlashConverter().convert(sys.argv[1], sys.argv[2], base_model=sys.argv[3], validate=True)
"""


def converter() -> Any:
    return get_host().converters()["zlab-dflash"]


def convert(src: Path, verifier: Path, out: Path, **options: Any) -> None:
    run_conversion(converter(), src, verifier=verifier, output=out, options=options, validate=True)


def test_the_config_keeps_zlab_meaning_in_speculators_terms(
    tmp_path: Path, tiny_verifier: Path
) -> None:
    """Layer ids shift by one (z-lab names a layer's output k, the format k + 1), the block is
    bidirectional in vLLM (sliding_window_non_causal), k = block_size - 1, the mask token kept."""
    make_zlab_dflash(tmp_path / "src", tiny_verifier, target_layer_ids=(0, 3, 6), block_size=5)
    convert(tmp_path / "src", tiny_verifier, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_model_type"] == "dflash"
    assert config["aux_hidden_state_layer_ids"] == [1, 4, 7]
    assert config["block_size"] == 5 and config["mask_token_id"] == 7
    assert config["sliding_window_non_causal"] is True
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "qwen3" and layer["num_hidden_layers"] == 2
    assert layer["layer_types"] == ["full_attention"] * 2
    assert "auto_map" not in config and "dflash_config" not in config
    model = load_speculator(tmp_path / "out", verifier=tiny_verifier)
    assert not model.causal_block and model.window is None
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert "lm_head.weight" not in names and "embed_tokens.weight" not in names

    convert(
        tmp_path / "src",
        tiny_verifier,
        tmp_path / "opts",
        aux_hidden_state_layer_ids=[2, 3, 5],
        mask_token_id=9,
        speculative_tokens=2,
    )
    config = json.loads((tmp_path / "opts" / "config.json").read_text())
    assert config["aux_hidden_state_layer_ids"] == [2, 3, 5] and config["mask_token_id"] == 9
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2


def test_validation_sees_the_block_causality(
    tmp_path: Path, tiny_verifier: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference runs z-lab's bidirectional block; had the conversion made it causal (what
    vLLM does with upstream's converted config), --validate would fail and write nothing."""
    make_zlab_dflash(tmp_path / "src", tiny_verifier)
    causal = functools.partial(zlab.dflash_reference, causal_block=True)

    def reference(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("causal_block")
        return causal(*args, **kwargs)

    monkeypatch.setattr(zlab, "dflash_reference", reference)
    with pytest.raises(ConversionError, match="validation failed: the converted draft's logits"):
        convert(tmp_path / "src", tiny_verifier, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _drop(name: str):
    def edit(src: Path) -> None:
        tensors = load_file(str(src / "model.safetensors"))
        tensors.pop(name)
        save_file(tensors, str(src / "model.safetensors"))

    return edit


def _add(name: str, shape: tuple[int, ...]):
    def edit(src: Path) -> None:
        tensors = load_file(str(src / "model.safetensors"))
        tensors[name] = torch.zeros(shape)
        save_file(tensors, str(src / "model.safetensors"))

    return edit


def _config(**changes: Any):
    def edit(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        for key, value in changes.items():
            if key.startswith("dflash_"):
                if value is None:
                    config["dflash_config"].pop(key.removeprefix("dflash_"))
                else:
                    config["dflash_config"][key.removeprefix("dflash_")] = value
            elif value is None:
                config.pop(key)
            else:
                config[key] = value
        (src / "config.json").write_text(json.dumps(config))

    return edit


FAULTS = {
    "no block size": (_config(block_size=None), "no block_size"),
    "last verifier layer": (
        _config(dflash_target_layer_ids=[1, 3, 7]),
        "include the last layer (7)",
    ),
    "no layer ids": (_config(dflash_target_layer_ids=None), "no target_layer_ids"),
    "no mask token": (_config(dflash_mask_token_id=None), "--set mask_token_id=ID"),
    "other verifier": (_config(num_target_layers=12), "num_target_layers is 12"),
    "wider draft": (_config(hidden_size=96), "hidden_size is 96"),
    "mixed layers": (
        _config(layer_types=["full_attention", "sliding_attention"], sliding_window=4),
        "mixes sliding-window and full-attention",
    ),
    "gated attention": (_add("layers.0.self_attn.g_proj.weight", (64, 64)), "g_proj"),
    "own lm_head": (_add("lm_head.weight", (259, 64)), "own lm_head.weight"),
    "missing tensor": (_drop("layers.1.self_attn.k_norm.weight"), "lacks tensor"),
    "unknown tensor": (_add("layers.0.extra.weight", (2,)), "layers.0.extra.weight"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_refusals_name_the_problem_and_leave_nothing(
    fault: str, tmp_path: Path, tiny_verifier: Path
) -> None:
    edit, needle = FAULTS[fault]
    make_zlab_dflash(tmp_path / "src", tiny_verifier)
    edit(tmp_path / "src")
    with pytest.raises(ConversionError) as caught:
        convert(tmp_path / "src", tiny_verifier, tmp_path / "out")
    message = str(caught.value)
    assert needle in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.*")) == []


def test_fused_and_split_projections_convert_to_the_same_folder(
    tmp_path: Path, tiny_verifier: Path
) -> None:
    make_zlab_dflash(tmp_path / "split", tiny_verifier)
    make_zlab_dflash(tmp_path / "fused", tiny_verifier, fused_qkv=True, kind="bin-sharded")
    convert(tmp_path / "split", tiny_verifier, tmp_path / "a")
    convert(tmp_path / "fused", tiny_verifier, tmp_path / "b")
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _upstream_python() -> Path:
    sys.path.insert(0, str(REPO / "plugins" / "eagle3" / "tests"))
    from test_eagle3_upstream import upstream_python

    return upstream_python()


@pytest.mark.parametrize("fused", [False, True])
def test_upstream_converter_writes_the_same_draft(
    fused: bool, tmp_path: Path, tiny_verifier: Path
) -> None:
    """Upstream 0.9.0's ``DFlashConverter`` (its venv) on the same z-lab folder: the same tensors,
    ids, block and mask token; ours differs only in ``sliding_window_non_causal`` (true: vLLM
    must run z-lab's bidirectional block). Its folder loads here and drafts what ours does."""
    python = _upstream_python()
    make_zlab_dflash(tmp_path / "src", tiny_verifier, fused_qkv=fused)
    done = subprocess.run(
        [
            str(python),
            "-c",
            UPSTREAM_CONVERT,
            str(tmp_path / "src"),
            str(tmp_path / "up"),
            str(tiny_verifier),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    convert(tmp_path / "src", tiny_verifier, tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "up" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "up" / "config.json").read_text())
    for key in ("aux_hidden_state_layer_ids", "block_size", "mask_token_id", "draft_vocab_size"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert (
        ours_cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
        == theirs_cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    )
    assert theirs_cfg["sliding_window_non_causal"] is False
    assert ours_cfg["sliding_window_non_causal"] is True
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 259, (1, 6), generator=generator)
    features = torch.randn(1, 6, 3 * 64, generator=generator, dtype=torch.float64)
    mine = load_speculator(tmp_path / "ours", verifier=tiny_verifier).eval()
    other = load_speculator(tmp_path / "up", verifier=tiny_verifier).eval()
    torch.testing.assert_close(
        mine.draft_logits(ids, features), other.draft_logits(ids, features), rtol=0, atol=0
    )
