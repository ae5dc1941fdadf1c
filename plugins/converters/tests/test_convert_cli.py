"""``speculators convert`` through the CLI: the happy path, detection errors and planted faults.

Every fault must give one clear line on stderr, a non-zero exit, and no output folder (nor a
temporary one) left behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _support import run_cli
from converter_helpers import make_safeailab_eagle, make_safeailab_eagle3
from safetensors.torch import load_file, save_file

from speculators_core import Converter, SpeculatorsError
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


def test_research_hass_layernorms_are_refused_with_the_reason(
    tmp_path: Path, tiny_verifier: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_safeailab_eagle(src, tiny_verifier, research_norms=True)
    result = run_cli(["convert", str(src), "--verifier", str(tiny_verifier), "-o", str(out)])
    _assert_clean_failure(result, out, "research HASS", "before fc", "no exact conversion")


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
