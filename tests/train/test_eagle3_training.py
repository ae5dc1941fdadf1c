"""End to end with the real EAGLE-3 plugin: data store -> ``speculators train`` -> final folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("speculators_eagle3")

from speculators_core.cli.train import train_command
from speculators_core.loading import load_speculator
from speculators_core.plugins import PluginHost, PluginSettings


@pytest.fixture(scope="module")
def eagle3_host():
    """A host with only the core and the EAGLE-3 plugin (no other installed plugin)."""
    from speculators_eagle3 import plugin

    return PluginHost(
        PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:eagle3", plugin)]
    )


@pytest.fixture(scope="module")
def eagle3_store(tmp_path_factory, prepared_data_8, eagle3_host) -> tuple[Path, Path]:
    """(verifier, store) with the hidden states EAGLE-3 asks for (3 aux layers + the last)."""
    from speculators_core.data.specs import spec_for_algorithm
    from speculators_core.data.store import capture_to_store

    verifier, prepared = prepared_data_8
    spec = spec_for_algorithm("eagle3", verifier, host=eagle3_host)
    out = tmp_path_factory.mktemp("eagle3-store") / "store"
    capture_to_store(verifier=verifier, prepared=prepared, output=out, spec=spec, dtype="bfloat16")
    return verifier, out


@pytest.fixture(scope="module")
def prepared_data_8(tmp_path_factory) -> tuple[Path, Path]:
    """An 8-layer tiny verifier (so EAGLE-3's default aux layers 2, 4, 5 are distinct) + data."""
    from train_samples import synthetic_chats

    from speculators_core.data.prepared import prepare_data
    from speculators_core.testing import make_tiny_verifier

    root = tmp_path_factory.mktemp("eagle3-data")
    verifier = make_tiny_verifier(root / "verifier", num_layers=8)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in synthetic_chats(16, seed=5)))
    prepare_data(verifier=verifier, sources=[chats], output=root / "prepared", seq_length=256)
    return verifier, root / "prepared"


def test_speculators_train_eagle3_on_a_store(eagle3_host, eagle3_store, tmp_path):
    """The CLI trains an EAGLE-3 draft (pruned vocab from the store) and writes a loadable folder."""
    verifier, store = eagle3_store
    out = tmp_path / "run"
    args = [
        "--algorithm", "eagle3", "--verifier", verifier, "--data", store, "--output", out,
        "--draft-vocab-size", "64", "--num-layers", "1", "--algo-opt", "ttt_steps=2",
        "--seq-len", "256", "--max-steps", "4", "--log-every", "1", "--learning-rate", "1e-3",
        "--no-progress", "--no-console-log",
    ]  # fmt: skip
    result = CliRunner().invoke(train_command, [str(a) for a in args], obj=eagle3_host)
    assert result.exception is None, repr(result.exception)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # Per-TTT-step metrics (cond_acc_s appears once some step-0 prediction is right).
    assert {"loss_0", "loss_1", "full_acc_0", "full_acc_1"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]

    config = json.loads((out / "final" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and "model_type" not in config
    assert config["draft_vocab_size"] == 64
    model = load_speculator(out / "final", host=eagle3_host, verifier=verifier)
    assert model.config.draft_vocab_size == 64
    assert torch.isfinite(torch.tensor([r["loss"] for r in train])).all()


def _first_loss(result, out: Path) -> float:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if "loss" in r)


def test_a_plugin_objective_installed_in_a_site_folder_trains_by_name(
    fixture_site, eagle3_store, tmp_path
):
    """The fixture distribution's 'fixture-half-kl' (0.5 x forward KL), installed with pip into a
    site folder, is listed and selectable with --loss: the first step's loss equals the core's
    kl=0.5 on the same seed and data; nothing in the core names it."""
    from _support import run_cli

    listing = run_cli(["objectives"], site=fixture_site)
    assert listing.returncode == 0, listing.stderr[-2000:]
    line = next(x for x in listing.stdout.splitlines() if x.startswith("fixture-half-kl"))
    assert "speculators-fixture-good" in line and "0.5 x forward KL" in line

    verifier, store = eagle3_store
    common = [
        "train", "--algorithm", "eagle3", "--verifier", str(verifier), "--data", str(store),
        "--draft-vocab-size", "64", "--algo-opt", "ttt_steps=2", "--algo-opt", "noise_std=0",
        "--seq-len", "256", "--max-steps", "1", "--log-every", "1", "--no-progress",
        "--no-console-log",
    ]  # fmt: skip
    plugin = run_cli([*common, "--output", str(tmp_path / "a"), "--loss", "fixture-half-kl"], site=fixture_site)  # fmt: skip
    core = run_cli([*common, "--output", str(tmp_path / "b"), "--loss", "kl=0.5"], site=fixture_site)  # fmt: skip
    full = run_cli([*common, "--output", str(tmp_path / "c")], site=fixture_site)
    half = _first_loss(plugin, tmp_path / "a")
    assert half == pytest.approx(_first_loss(core, tmp_path / "b"), rel=1e-6)
    assert half == pytest.approx(0.5 * _first_loss(full, tmp_path / "c"), rel=1e-6)
    recorded = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert recorded["algo_options"]["objective"] == "fixture-half-kl"

    unknown = run_cli([*common, "--output", str(tmp_path / "d"), "--loss", "focal"], site=fixture_site)  # fmt: skip
    assert unknown.returncode != 0
    assert "no installed plugin provides objective 'focal' (installed: ce, fixture-half-kl" in (
        unknown.stderr
    )
    assert not (tmp_path / "d").exists()


def test_speculators_train_peagle_on_the_same_store(eagle3_host, eagle3_store, tmp_path):
    """The CLI trains a P-EAGLE draft from the EAGLE-3 store (same hidden states) and writes a
    folder that loads as P-EAGLE and passes its check rules."""
    from speculators_eagle3 import PEagleDraftModel

    from speculators_core.check import check_checkpoint

    verifier, store = eagle3_store
    out = tmp_path / "run"
    args = [
        "--algorithm", "peagle", "--verifier", verifier, "--data", store, "--output", out,
        "--draft-vocab-size", "64", "--algo-opt", "num_depths=3", "--algo-opt", "mask_token_id=7",
        "--seq-len", "256", "--max-steps", "4", "--log-every", "1", "--learning-rate", "1e-3",
        "--no-progress", "--no-console-log",
    ]  # fmt: skip
    result = CliRunner().invoke(train_command, [str(a) for a in args], obj=eagle3_host)
    assert result.exception is None, repr(result.exception)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss_0", "loss_1", "loss_2", "full_acc_0", "est_accept_len"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle" and config["mask_token_id"] == 7
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    model = load_speculator(out / "final", host=eagle3_host, verifier=verifier)
    assert type(model) is PEagleDraftModel
    assert check_checkpoint(out / "final", host=eagle3_host).findings == []


def test_speculators_train_dflash_on_the_same_store(eagle3_store, tmp_path):
    """The CLI trains a DFlash draft from the same store (the same verifier states, unshifted)
    and writes a folder that loads as DFlash and passes its check rules."""
    dflash = pytest.importorskip("speculators_dflash")
    from speculators_dflash import plugin as dflash_plugin

    from speculators_core.check import check_checkpoint

    host = PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[("speculators.algorithms:dflash", dflash_plugin)],
    )
    verifier, store = eagle3_store
    out = tmp_path / "run"
    args = [
        "--algorithm", "dflash", "--verifier", verifier, "--data", store, "--output", out,
        "--draft-vocab-size", "64", "--algo-opt", "block_size=4", "--algo-opt", "max_anchors=16",
        "--seq-len", "256", "--max-steps", "4", "--log-every", "1", "--learning-rate", "1e-3",
        "--no-progress", "--no-console-log",
    ]  # fmt: skip
    result = CliRunner().invoke(train_command, [str(a) for a in args], obj=host)
    assert result.exception is None, repr(result.exception)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss_0", "loss_2", "full_acc_0", "est_accept_len"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["speculators_model_type"] == "dflash" and config["block_size"] == 4
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    model = load_speculator(out / "final", host=host, verifier=verifier)
    assert type(model) is dflash.DFlashDraftModel
    assert check_checkpoint(out / "final", host=host).findings == []
