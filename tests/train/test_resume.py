"""Exact resume: a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_samples import random_samples

from speculators_core.train import (
    InMemorySource,
    ResumeError,
    Trainer,
    TrainingArguments,
    latest_checkpoint,
    list_checkpoints,
)

SCRIPT = Path(__file__).resolve().parent / "train_script.py"
#: The run: 48 samples (10% held out), rows of 64 tokens, 2 rows per step, 3 epochs of 8 steps,
#: a checkpoint every 5 steps and per epoch, hidden-state noise on (so RNG restore matters).
COMMON = ["--rows", "2", "--epochs", "3", "--save-every", "5", "--noise", "0.05"]


def _start(out: Path, verifier: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(out),
            "--verifier",
            str(verifier),
            *COMMON,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _records(path: Path) -> list[dict]:
    strip = {"tokens_per_s", "train_seconds"}  # wall-clock, differs between runs
    return [
        {k: v for k, v in json.loads(line).items() if k not in strip}
        for line in path.read_text().splitlines()
    ]


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(small_verifier, tmp_path):
    """Kill at a random step (after the first checkpoint), resume: identical weights and logs."""
    total = 24  # 3 epochs x 8 steps
    kill_at = random.Random().randint(6, total - 1)  # a fresh random step each run
    # The uninterrupted reference and the run to be killed run side by side.
    reference = _start(tmp_path / "reference", small_verifier)
    killed = _start(tmp_path / "run", small_verifier, "--kill-at-step", str(kill_at))
    code, err = _finish(killed)
    assert code == -signal.SIGKILL, f"kill at step {kill_at}: {err[-2000:]}"
    assert not (tmp_path / "run" / "final").exists()
    assert latest_checkpoint(tmp_path / "run") is not None

    code, err = _finish(_start(tmp_path / "run", small_verifier, "--resume"))
    assert code == 0, err[-2000:]
    code, err = _finish(reference)
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "reference" / "result.json").read_text())["global_step"] == total
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert 0 < result["resumed_from_step"] < kill_at, (kill_at, result["resumed_from_step"])

    want = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    got = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after a kill at step {kill_at}"
    # Same data, same order, same numbers: the metric logs agree record for record.
    assert _records(tmp_path / "run" / "metrics.jsonl") == _records(
        tmp_path / "reference" / "metrics.jsonl"
    )


def _args(out: Path, **changes) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        seq_len=32,
        num_epochs=2,
        save_every=3,
        progress=False,
        console_log=False,
    )
    return TrainingArguments(**{**base, **changes})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_in_process_resume_from_each_checkpoint_is_exact(host, small_verifier, tmp_path, optimizer):
    """Resuming from a mid-epoch or an epoch-end checkpoint gives the uninterrupted weights
    (with Muon too: its momentum and AdamW's moments travel in one optimizer state)."""
    samples = random_samples(20, hidden=32, vocab=256, seed=3)
    model_cls = host.algorithm("fixture-mlp").model_class
    torch.manual_seed(0)
    Trainer(
        model_cls.from_verifier(small_verifier),
        _args(tmp_path / "full", save_total_limit=None, optimizer=optimizer),
        InMemorySource(samples),
        host=host,
    ).train()
    want = load_file(tmp_path / "full" / "final" / "model.safetensors")
    checkpoints = list_checkpoints(tmp_path / "full")
    states = {
        step: json.loads((path / "trainer_state.json").read_text()) for step, path in checkpoints
    }
    mid_epoch = next(s for s, st in states.items() if st["step_in_epoch"] > 0)
    epoch_end = next(s for s, st in states.items() if st["epoch"] == 1 and st["step_in_epoch"] == 0)
    for step, path in checkpoints:
        if step not in (mid_epoch, epoch_end):
            continue
        torch.manual_seed(99)  # a different initialisation: the checkpoint must overwrite it
        out = tmp_path / f"from-{step}"
        trainer = Trainer(
            model_cls.from_verifier(small_verifier),
            _args(out, save_total_limit=None, optimizer=optimizer),
            InMemorySource(samples),
            host=host,
        )
        result = trainer.train(resume_from=path)
        got = load_file(out / "final" / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want), step
        assert result.state.global_step == checkpoints[-1][0]


def test_resume_refuses_a_different_data_plan(host, small_verifier, tmp_path):
    """Changing seq_len or the seed breaks the data position: a one-line ResumeError."""
    samples = random_samples(12, hidden=32, vocab=256, seed=3)
    model_cls = host.algorithm("fixture-mlp").model_class
    Trainer(
        model_cls.from_verifier(small_verifier),
        _args(tmp_path / "run", num_epochs=1),
        InMemorySource(samples),
        host=host,
    ).train()
    path = latest_checkpoint(tmp_path / "run")
    trainer = Trainer(
        model_cls.from_verifier(small_verifier),
        _args(tmp_path / "run", num_epochs=2, seq_len=48),
        InMemorySource(samples),
        host=host,
    )
    with pytest.raises(ResumeError, match=r"seq_len: 32 -> 48"):
        trainer.train(resume_from=path)


def test_resume_refuses_another_world_size_and_incomplete_checkpoints(
    host, small_verifier, tmp_path
):
    """A checkpoint of 2 processes in 1, or one missing its optimizer, cannot be resumed."""
    samples = random_samples(12, hidden=32, vocab=256, seed=3)
    model_cls = host.algorithm("fixture-mlp").model_class
    Trainer(
        model_cls.from_verifier(small_verifier),
        _args(tmp_path / "run", num_epochs=1),
        InMemorySource(samples),
        host=host,
    ).train()
    path = latest_checkpoint(tmp_path / "run")
    assert path is not None
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))

    def fresh() -> Trainer:
        return Trainer(
            model_cls.from_verifier(small_verifier),
            _args(tmp_path / "run"),
            InMemorySource(samples),
            host=host,
        )

    with pytest.raises(ResumeError, match="written by 2 process"):
        fresh().train(resume_from=path)
    state_file.write_text(json.dumps(state))
    (path / "optimizer.pt").unlink()
    with pytest.raises(ResumeError, match=r"lacks optimizer\.pt"):
        fresh().train(resume_from=path)


def test_interrupted_checkpoint_writes_are_invisible(tmp_path):
    """A temporary folder left by a killed write is never taken for a checkpoint."""
    root = tmp_path / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    (root / "step-4" / "trainer_state.json").write_text("{}")
    (root / ".step-8.tmp-abc123").mkdir()
    (root / ".step-8.tmp-abc123" / "trainer_state.json").write_text("{}")
    (root / "step-12").mkdir()  # no trainer_state.json: not complete
    assert latest_checkpoint(tmp_path) == root / "step-4"
