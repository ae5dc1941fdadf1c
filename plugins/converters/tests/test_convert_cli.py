"""``speculators convert`` through the CLI: the happy path, detection errors and planted faults.

Every fault must give one clear line on stderr, a non-zero exit, and no output folder (nor a
temporary one) left behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import run_cli
from converter_helpers import make_safeailab_eagle, make_safeailab_eagle3
from safetensors.torch import load_file, save_file

from speculators_core import Converter, SpeculatorsError, load_speculator
from speculators_core.cli.convert import detect_format, parse_option


def _assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_cli_detects_converts_and_validates(tmp_path: Path, tiny_verifier: Path) -> None:
    make_safeailab_eagle3(tmp_path / "src", tiny_verifier, kind="safetensors-sharded")
    out = tmp_path / "out"
    args = [
        "convert",
        str(tmp_path / "src"),
        "--verifier",
        str(tiny_verifier),
        "--output",
        str(out),
    ]
    result = run_cli([*args, "--validate", "--set", "speculative_tokens=4"])
    assert result.returncode == 0, result.stderr
    assert "converted from safeailab-eagle3 to 'eagle3'" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    again = run_cli(args)
    _assert_clean_failure(again, tmp_path / "unused", "already exists", "--overwrite")
    assert run_cli([*args, "--overwrite", "--from", "safeailab-eagle3"]).returncode == 0


def test_cli_unknown_format_lists_the_known_ones(tmp_path: Path, tiny_verifier: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    result = run_cli(["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out)])
    _assert_clean_failure(
        result, out, "no format", "safeailab-eagle3", "speculators-eagle", "--from"
    )
    result = run_cli(
        ["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out), "--from", "medusa"]
    )
    _assert_clean_failure(result, out, "unknown source format 'medusa'", "safeailab-eagle")


def test_ambiguous_detection_names_every_match(tmp_path: Path) -> None:
    def always(_folder: Path, _config: dict) -> bool:
        return True

    def never(_folder: Path, _config: dict) -> bool:
        return False

    def broken(_folder: Path, _config: dict) -> bool:
        raise RuntimeError("cannot read")

    def convert(*_a: object, **_k: object) -> None:  # pragma: no cover - never called
        raise AssertionError

    converters = {
        name: Converter(name=name, algorithm="eagle3", detect=fn, convert=convert)
        for name, fn in (("a", always), ("b", always), ("c", never), ("d", broken))
    }
    with pytest.raises(
        SpeculatorsError, match=r"matches several formats \(a, b; known formats: a, b, c, d\)"
    ):
        detect_format(tmp_path, converters)
    del converters["b"]
    assert detect_format(tmp_path, converters).name == "a"


def test_parse_option() -> None:
    assert parse_option("eagle_aux_hidden_state_layer_ids=[1,2,3]") == (
        "eagle_aux_hidden_state_layer_ids",
        [1, 2, 3],
    )
    assert parse_option("norm-before-residual=true") == ("norm_before_residual", True)
    assert parse_option("verifier_name_or_path=org/model") == ("verifier_name_or_path", "org/model")
    with pytest.raises(SpeculatorsError, match="not KEY=VALUE"):
        parse_option("novalue")


# ------------------------------------------------------------------------------------------------
# Planted faults
# ------------------------------------------------------------------------------------------------


def _truncate(src: Path) -> None:
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])


def _drop_tensor(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["midlayer.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _wrong_shape(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"][:, :100].contiguous()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))

    return edit


FAULTS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated": (_truncate, ("truncated", "model.safetensors")),
    "missing-tensor": (_drop_tensor, ("lacks tensor 'midlayer.mlp.up_proj.weight'",)),
    "wrong-shape": (_wrong_shape, ("'fc.weight' has shape [64, 100]", "[64, 192]")),
    "hidden-size": (_edit_config(hidden_size=96), ("hidden_size is 96", "hidden size 64")),
    "vocab": (_edit_config(vocab_size=1000), ("vocab_size is 1000", "vocab 259")),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault_is_one_clear_line(fault: str, tmp_path: Path, tiny_verifier: Path) -> None:
    plant, needles = FAULTS[fault]
    src, out = tmp_path / "src", tmp_path / "out"
    make_safeailab_eagle3(src, tiny_verifier)
    plant(src)
    result = run_cli(
        [
            "convert",
            str(src),
            "--verifier",
            str(tiny_verifier),
            "-o",
            str(out),
            "--from",
            "safeailab-eagle3",
        ]
    )
    _assert_clean_failure(result, out, *needles)


class _NotATensor:
    """Pickled into a checkpoint to check that it is never unpickled."""


@pytest.mark.parametrize(
    ("payload", "needles"),
    [
        ("a string", ("holds a str under 'note'", "not a tensor")),
        (_NotATensor(), ("objects other than tensors", "never unpickled")),
    ],
    ids=["str", "object"],
)
def test_pickle_with_a_non_tensor_is_refused(
    payload: object, needles: tuple[str, ...], tmp_path: Path, tiny_verifier: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    tensors = make_safeailab_eagle(src, tiny_verifier)
    torch.save({**tensors, "note": payload}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    result = run_cli(
        [
            "convert",
            str(src),
            "--verifier",
            str(tiny_verifier),
            "-o",
            str(out),
            "--from",
            "safeailab-eagle",
        ]
    )
    _assert_clean_failure(result, out, "pytorch_model.bin", *needles)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def research_hass_forward(
    src: dict[str, torch.Tensor],
    config: dict[str, Any],
    lm_head: torch.Tensor,  # [V, H] the verifier's
    tokens: torch.Tensor,  # [L]
    features: torch.Tensor,  # [L, H]
) -> torch.Tensor:
    """The research HASS forward (``llama_eagle_full_grad.py``) in float64, from SOURCE names.

    ``e = embed_layernorm(embed_tokens(x))``, ``f' = hidden_layernorm(f)``,
    ``h = fc(cat[e, f'])``, a Llama layer with no input norm (residual ``h``; causal GQA
    attention, RoPE at positions 0..), ``logits = lm_head(lm_head_layernorm(out))``. ``[L, V]``.
    """
    w = {name: t.double() for name, t in src.items()}
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    heads, kv_heads, dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    length = tokens.shape[0]
    e = _rms(w["embed_tokens.weight"][tokens], w["embed_layernorm.weight"], eps)
    f = _rms(features.double(), w["hidden_layernorm.weight"], eps)
    h = torch.cat([e, f], dim=-1) @ w["fc.weight"].T
    if "fc.bias" in w:
        h = h + w["fc.bias"]
    q = (h @ w["layers.0.self_attn.q_proj.weight"].T).view(length, heads, dim)
    k = (h @ w["layers.0.self_attn.k_proj.weight"].T).view(length, kv_heads, dim)
    v = (h @ w["layers.0.self_attn.v_proj.weight"].T).view(length, kv_heads, dim)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]  # [L, d/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(t: torch.Tensor) -> torch.Tensor:
        first, second = t[..., : dim // 2], t[..., dim // 2 :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    q, k = rope(q), rope(k)
    attn = torch.zeros(length, heads, dim, dtype=torch.float64)
    for head in range(heads):
        kv = head // (heads // kv_heads)
        scores = q[:, head] @ k[:, kv].T / dim**0.5
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        attn[:, head] = torch.softmax(scores, dim=-1) @ v[:, kv]
    h = h + attn.reshape(length, heads * dim) @ w["layers.0.self_attn.o_proj.weight"].T
    normed = _rms(h, w["layers.0.post_attention_layernorm.weight"], eps)
    gate = normed @ w["layers.0.mlp.gate_proj.weight"].T
    up = normed @ w["layers.0.mlp.up_proj.weight"].T
    h = h + (torch.nn.functional.silu(gate) * up) @ w["layers.0.mlp.down_proj.weight"].T
    return _rms(h, w["lm_head_layernorm.weight"], eps) @ lm_head.double().T


def test_research_hass_converts_exactly(tmp_path: Path, tiny_verifier: Path) -> None:
    """The research HASS layout converts, validates, and reproduces its own forward exactly."""
    from speculators_hass import EagleDraftModel

    from speculators_core.modeling import KVCache

    src, out = tmp_path / "src", tmp_path / "out"
    source = make_safeailab_eagle(src, tiny_verifier, research_norms=True)
    args = ["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out), "--validate"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    assert "converted from safeailab-eagle to 'eagle'" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["layernorms"] is True and config["feature_norm_before_fc"] is True
    written = load_file(str(out / "model.safetensors"))
    for source_name, name in (
        ("embed_layernorm.weight", "embedding_layernorm.weight"),
        ("hidden_layernorm.weight", "feature_layernorm.weight"),
        ("lm_head_layernorm.weight", "pre_lm_head_layernorm.weight"),
        ("fc.weight", "fusion_fc.weight"),
    ):
        assert torch.equal(written[name], source[source_name]), name
    assert "transformer.input_layernorm.weight" not in written

    model = load_speculator(out, verifier=tiny_verifier).eval()
    assert isinstance(model, EagleDraftModel)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, model.config.verifier_vocab_size, (9,), generator=gen)
    features = torch.randn(9, 64, generator=gen) * 2.0
    with torch.no_grad():
        h = model.decode(
            tokens[None],
            features[None],
            torch.arange(9)[None],
            cache=KVCache(1),
            mask=torch.ones(9, 9, dtype=torch.bool).tril()[None, None],
            implementation="eager",
        )
        logits = model.head(h)[0].double()
    source_config = json.loads((src / "config.json").read_text())
    verifier_lm_head = load_file(str(tiny_verifier / "model.safetensors"))["lm_head.weight"]
    expected = research_hass_forward(source, source_config, verifier_lm_head, tokens, features)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_unknown_extra_norm_is_refused(tmp_path: Path, tiny_verifier: Path) -> None:
    """A norm the research forward does not have (post_embedding_layernorm): one line, no output."""
    src, out = tmp_path / "src", tmp_path / "out"
    tensors = make_safeailab_eagle(src, tiny_verifier, research_norms=True)
    tensors["post_embedding_layernorm.weight"] = torch.ones(64)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli(["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out)])
    _assert_clean_failure(result, out, "post_embedding_layernorm.weight", "does not know")


def test_validation_failure_leaves_nothing(tmp_path: Path, tiny_verifier: Path) -> None:
    """An EAGLE-1 draft trained with its own embedding cannot share the verifier's: --validate says so."""
    src, out = tmp_path / "src", tmp_path / "out"
    tensors = make_safeailab_eagle(src, tiny_verifier)
    tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"] + 0.5
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    args = ["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out)]
    result = run_cli([*args, "--validate"])
    _assert_clean_failure(result, out, "validation failed", "differ from the source's forward")
    assert run_cli(args).returncode == 0  # without --validate the conversion itself succeeds
