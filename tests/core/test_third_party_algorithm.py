"""A third-party algorithm, installed like any distribution, through every command: no core change.

The fixture distribution ``speculators-fixture-good`` (``tests/fixtures/good_plugin``, pip-
installed into a site folder) provides the ``fixture-mlp`` algorithm (not EAGLE) with its own
check rule and vLLM serving record, and the ``fixture-layout`` converter of a made-up layout.
Each command runs in a subprocess that sees the installed entry points, as a user's would.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from _support import run_cli
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

QUESTIONS = [
    "How do plants grow?",
    "Tell me about the sea.",
    "What is a good breakfast?",
    "Why is the sky blue?",
    "Name three colours.",
    "How do I bake bread?",
    "What do cats eat?",
    "Explain rain to a child.",
]


def _layout(tmp_path: Path, verifier: Path) -> Path:
    from speculators_fixture_good.convert import write_layout

    config = json.loads((verifier / "config.json").read_text())
    source = tmp_path / "research-ckpt"
    write_layout(source, hidden=config["hidden_size"], vocab=config["vocab_size"], k=4)
    return source


@pytest.fixture
def converted(fixture_site: Path, tiny_verifier: Path, tmp_path: Path) -> Path:
    """The made-up layout converted with --validate (format detected, not named)."""
    source, out = _layout(tmp_path, tiny_verifier), tmp_path / "draft"
    args = ["convert", str(source), "--verifier", str(tiny_verifier), "--output", str(out)]
    result = run_cli([*args, "--validate"], site=fixture_site)
    assert result.returncode == 0, result.stderr
    assert "validated: max |logit difference|" in result.stderr
    return out


def test_convert_validate_maps_the_made_up_layout_exactly(converted: Path, tmp_path: Path):
    """The converter's mapping, checked independently: fc is the layout's mix, transposed."""
    source = load_file(str(tmp_path / "research-ckpt" / "weights.safetensors"))
    written = load_file(str(converted / "model.safetensors"))
    assert torch.equal(written["fc.weight"], source["mix"].t())
    assert torch.equal(written["embed_tokens.weight"], source["emb"])
    config = json.loads((converted / "config.json").read_text())
    assert config["speculators_model_type"] == "fixture-mlp" and "model_type" not in config
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4


def test_convert_validate_catches_a_wrong_mapping_and_writes_nothing(
    fixture_site: Path, tiny_verifier: Path, tmp_path: Path
):
    """--dtype is kept; a draft that does not reproduce the source's forward fails --validate."""
    source = _layout(tmp_path, tiny_verifier)
    out = tmp_path / "draft"
    args = ["convert", str(source), "--verifier", str(tiny_verifier), "--output", str(out)]
    good = run_cli([*args, "--validate", "--dtype", "bfloat16"], site=fixture_site)
    assert good.returncode == 0, good.stderr
    bf16 = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())

    # A buggy converter (the halves of fc swapped: features before embeddings, a mistake the
    # shapes cannot catch) stands in for a wrong mapping: the core's --validate must refuse it.
    bad_out = tmp_path / "bad"
    code = (
        "import dataclasses, sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from speculators_core import get_host\n"
        "from speculators_core.conversion import run_conversion\n"
        "from speculators_core.errors import ConversionError\n"
        "conv = get_host().converter('fixture-layout')\n"
        "def buggy(source, *, verifier, output, dtype=None, **options):\n"
        "    reference = conv.convert(source, verifier=verifier, output=output, dtype=dtype)\n"
        "    w = load_file(f'{output}/model.safetensors')\n"
        "    h = w['fc.weight'].shape[0]\n"
        "    w['fc.weight'] = torch.cat([w['fc.weight'][:, h:], w['fc.weight'][:, :h]], 1)\n"
        "    save_file(w, f'{output}/model.safetensors')\n"
        "    return reference\n"
        "try:\n"
        f"    run_conversion(dataclasses.replace(conv, convert=buggy), {str(source)!r},\n"
        f"                   verifier={str(tiny_verifier)!r}, output={str(bad_out)!r},\n"
        "                   validate=True)\n"
        "except ConversionError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    from _support import run_python

    result = run_python(code, site=fixture_site)
    assert result.returncode == 3, result.stderr
    assert "logits differ from the source's forward" in result.stdout
    assert not bad_out.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_check_runs_the_plugins_own_rule(converted: Path, fixture_site: Path, tmp_path: Path):
    clean = run_cli(["check", str(converted), "--json"], site=fixture_site)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    weights = load_file(str(converted / "model.safetensors"))
    weights["fc.weight"] = weights["fc.weight"][:, :-1].contiguous()
    save_file(weights, str(converted / "model.safetensors"))
    faulty = run_cli(["check", str(converted), "--json"], site=fixture_site)
    assert faulty.returncode == 1
    codes = [f["code"] for f in json.loads(faulty.stdout)]
    assert codes == ["fixture-fc-shape"]  # its own rule, and no EAGLE rule


def test_serve_print_only_uses_the_plugins_method(converted: Path, fixture_site: Path):
    result = run_cli(
        ["serve", str(converted), "--print-only", "--device", "gpu"], site=fixture_site
    )
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["method"] == "fixture-mlp-vllm" and spec["fixture_option"] == 7
    assert spec["num_speculative_tokens"] == 4


def test_quickstart_trains_the_plugins_algorithm(
    fixture_site: Path, tiny_verifier: Path, tmp_path: Path
):
    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as handle:
        for q in QUESTIONS:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": "ok."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "prompts.txt").write_text("How do trees drink?\nWhat is snow?\n")
    out = tmp_path / "run"
    args = [
        "quickstart", "--algorithm", "fixture-mlp", "--verifier", str(tiny_verifier),
        "--data", str(chats), "--output", str(out), "--budget-minutes", "0.5",
        "--eval-reserve-minutes", "0.1", "--samples", "8", "--max-new-tokens", "16",
        "--draft-vocab-size", "64", "--train-seq-len", "128", "--no-vllm-eval", "--no-server-eval",
        "--prompts", str(tmp_path / "prompts.txt"), "--eval-prompts", "2",
        "--eval-max-new-tokens", "8", "-k", "2",
    ]  # fmt: skip
    result = run_cli(args, site=fixture_site)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "speculator" / "config.json").read_text())
    assert config["speculators_model_type"] == "fixture-mlp"
    report = json.loads((out / "report.json").read_text())
    evaluation, sampled = report["evaluation"]  # greedy, then temperature 1
    assert report["measured_by"] == evaluation["engine"] == "reference"
    assert sampled["temperature"] == 1.0 and sampled["engine"] == "reference"
    rates = evaluation["acceptance_rate_per_position"]
    assert len(rates) == 2  # k = 2
    assert report["mean_acceptance_length"] == pytest.approx(1 + sum(rates), abs=1e-9)
    assert "fixture-mlp-vllm" in report["serve_command"]
    assert "fixture-mlp-vllm" in result.stdout  # the printed serve line is the plugin's
