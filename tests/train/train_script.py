"""A small training run for subprocess tests (plain ``python`` or ``torchrun``).

Trains the fixture algorithm (``fixture-mlp``) on seeded random samples and writes
``<out>/result.json`` (rank 0) with the logged history and the step the run resumed from.

    python train_script.py --out DIR --verifier DIR [--rows 2] [--resume] [--kill-at-step K]
    torchrun --nproc_per_node 2 train_script.py --out DIR --verifier DIR --rows 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "fixtures" / "good_plugin"))
sys.path.insert(0, str(HERE))

from speculators_fixture_good import plugin  # noqa: E402
from train_samples import random_samples  # noqa: E402

from speculators_core.plugins import PluginHost  # noqa: E402
from speculators_core.train import (  # noqa: E402
    InMemorySource,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class Probe(TrainerCallback):
    """Records where the run started; optionally slows steps down or kills the process."""

    def __init__(self, kill_at_step: int | None, step_delay: float) -> None:
        self.kill_at_step = kill_at_step
        self.step_delay = step_delay
        self.resumed_from_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.resumed_from_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Killed between backward and the optimizer step: the most state in flight.
        if self.kill_at_step is not None and state.global_step + 1 == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_delay:
            time.sleep(self.step_delay)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    opts = parser.parse_args()

    host = PluginHost(entry_points=False, plugins=[("speculators.algorithms:fixture-mlp", plugin)])
    torch.manual_seed(1234)
    model = host.algorithm("fixture-mlp").model_class.from_verifier(
        opts.verifier, noise_std=opts.noise
    )
    hidden = model.config.hidden_size
    samples = random_samples(opts.samples, hidden=hidden, vocab=model.config.vocab_size, seed=7)
    args = TrainingArguments(
        output_dir=opts.out,
        num_epochs=opts.epochs,
        seq_len=opts.seq_len,
        micro_batch_rows=opts.rows,
        grad_accum_steps=opts.accum,
        learning_rate=5e-3,
        log_every=1,
        save_every=opts.save_every,
        save_total_limit=None,
        val_fraction=0.1,
        progress=False,
        console_log=False,
    )
    probe = Probe(opts.kill_at_step, opts.step_delay)
    trainer = Trainer(model, args, InMemorySource(samples), callbacks=[probe], host=host)
    result = trainer.train(resume_from="latest" if opts.resume else None)
    if result.state.is_world_process_zero:
        Path(opts.out, "result.json").write_text(
            json.dumps(
                {
                    "resumed_from_step": probe.resumed_from_step,
                    "global_step": result.state.global_step,
                    "world_size": result.state.world_size,
                    # FSDP2 turns parameters into sharded DTensors; a plain run keeps tensors.
                    "sharded_parameters": sum(
                        type(p).__name__ == "DTensor" for p in model.parameters()
                    ),
                    "log_history": result.state.log_history,
                }
            )
        )


if __name__ == "__main__":
    main()
