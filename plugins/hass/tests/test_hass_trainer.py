"""HASS through the core trainer: a short run, then stage 2 of the two-stage recipe from stage 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hass_helpers import random_samples
from speculators_hass import EagleDraftModel, two_stage_commands, two_stage_schedule

from speculators_core import load_speculator
from speculators_core.train import InMemorySource, Trainer, TrainingArguments

QUIET: dict[str, Any] = {"progress": False, "console_log": False, "tensorboard": False}


def test_trainer_runs_both_stages(tiny_verifier: Path, verifier_model: Any, tmp_path: Path) -> None:
    """Stage 1 (topk_w=0) and stage 2 (topk_w=1, init_from stage 1) train and save eagle folders."""
    samples = random_samples(verifier_model, [24, 30, 18, 27, 22, 31, 20, 25], seed=1)
    stage1, stage2 = two_stage_schedule(stage1_epochs=2, stage2_epochs=1)
    torch.manual_seed(0)
    first = EagleDraftModel.from_verifier(tiny_verifier, topk_w=stage1.topk_w)
    args = TrainingArguments(
        output_dir=str(tmp_path / "stage1"),
        num_epochs=stage1.num_epochs,
        seq_len=64,
        micro_batch_rows=2,
        learning_rate=3e-3,
        val_fraction=0.25,
        **QUIET,
    )
    result = Trainer(first, args, InMemorySource(samples)).train()
    assert result.state.global_step > 0
    for key in ("val_loss", "val_cond_acc_0", "val_vloss_2", "val_topk_loss_1"):
        assert key in result.metrics, key
    logged = [
        json.loads(line)
        for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("cond_acc_0" in record for record in logged)

    second = EagleDraftModel.from_verifier(
        tiny_verifier, topk_w=stage2.topk_w, init_from=result.final_dir
    )
    trained = load_speculator(result.final_dir)
    for name, tensor in trained.state_dict().items():
        if name not in ("embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(second.state_dict()[name], tensor), name
    args2 = args.replace(output_dir=str(tmp_path / "stage2"), num_epochs=stage2.num_epochs)
    final = Trainer(second, args2, InMemorySource(samples)).train().final_dir
    loaded = load_speculator(final, verifier=tiny_verifier)
    assert type(loaded) is EagleDraftModel
    assert not torch.equal(loaded.fusion_fc.weight, trained.fusion_fc.weight)


def test_two_stage_commands() -> None:
    """The recipe's command lines: stage 2 starts from stage 1's final folder."""
    first, second = two_stage_commands(
        verifier="V", data="D", output="run", extra_args=("--seq-len", "512")
    )
    assert first[:10] == [
        "speculators",
        "train",
        "--algorithm",
        "eagle",
        "--verifier",
        "V",
        "--data",
        "D",
        "--output",
        "run/stage1",
    ]
    assert "topk_w=0.0" in first and "--seq-len" in first
    assert first[first.index("--learning-rate") + 1] == "3e-05"
    assert first[first.index("--num-epochs") + 1] == "40"
    assert json.loads(first[first.index("--optimizer-kwargs") + 1]) == {"betas": [0.9, 0.95]}
    assert "topk_w=1.0" in second and "init_from=run/stage1/final" in second
    assert second[second.index("--learning-rate") + 1] == "1e-05"
    assert second[second.index("--num-epochs") + 1] == "10"
