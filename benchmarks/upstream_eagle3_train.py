"""Train upstream speculators 0.9.0's EAGLE-3 draft on a CPU for a wall-clock budget.

Run by the Python of upstream's own venv (it imports upstream ``speculators``, never
``speculators_core``) from ``bench_tau_vs_upstream.py``::

    UPSTREAM_VENV/bin/python benchmarks/upstream_eagle3_train.py WORK

``WORK/settings.json`` (written by the benchmark) names the shard store, the packed rows of
each epoch (``[sample, start, length]`` pieces, our trainer's plan), the initial draft folder,
the hyper-parameters and the budget. Upstream's ``Trainer`` cannot run on a CPU (it moves the
model to ``cuda:0`` and autocasts on ``cuda``), so this drives what its training loop does per
step, with upstream's own pieces: batches from ``shift_batch``, ``Eagle3DraftModel.forward``
(SDPA attention; the eager KL loss, since the default fused one needs Triton), backward,
gradient clipping at 1.0 (as its loop does), the AdamW of its ``build_optimizers`` and the
cosine schedule its ``--scheduler-type cosine`` builds (transformers'
``get_cosine_schedule_with_warmup``, 0.5 cycles).

Like the quickstart, a few calibration steps (one warm-up, then the best of three) fix the step
count from the budget, and so the schedule; then the draft trains from its initial weights,
epoch after epoch over the rows, until the planned steps are done or the timed seconds reach
the budget. Timed per step: building the batch, forward, backward, clipping, optimizer and
scheduler (what our trainer's ``train_seconds`` counts). The draft is saved with upstream's
``save_pretrained``; ``WORK/upstream-result.json`` records the figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import kl_div_loss
from speculators.models.eagle3.data import shift_batch
from speculators.train.optimizers import build_optimizers
from transformers import get_cosine_schedule_with_warmup

CALIBRATION_STEPS = 3  # timed, after one warm-up step (as the quickstart calibrates ours)


class StoreReader:
    """Samples of a finished shard store (layout in ``speculators_core.data.store``)."""

    def __init__(self, store: Path) -> None:
        manifest = json.loads((store / "manifest.json").read_text())
        self.shard_size = int(manifest["shard_size"])
        self.files = [store / s["file"] for s in manifest["shards"]]
        self.handles: dict[int, tuple[Any, list[int]]] = {}

    def piece(self, sample: int, start: int, length: int) -> dict[str, torch.Tensor]:
        """Tokens ``[start, start + length)`` of ``sample``."""
        shard = sample // self.shard_size
        if shard not in self.handles:
            handle = safe_open(str(self.files[shard]), framework="pt")
            self.handles[shard] = (handle, handle.get_tensor("offsets").tolist())
        handle, offsets = self.handles[shard]
        lo = offsets[sample - shard * self.shard_size] + start
        return {
            "input_ids": handle.get_slice("input_ids")[lo : lo + length].long(),
            "loss_mask": handle.get_slice("loss_mask")[lo : lo + length].long(),
            "hidden_states": handle.get_slice("hidden_states")[lo : lo + length].float(),
        }


def row_batch(store: StoreReader, row: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
    """One packed row as upstream's collate makes it: each piece through ``shift_batch``,
    concatenated, right-padded to ``seq_len`` with ``document_ids`` ``-1`` on the padding."""
    parts = []
    for sample, start, length in row:
        raw = store.piece(sample, start, length)
        states = raw["hidden_states"]  # [L, 4, H]: three aux layers, then the last layer
        parts.append(
            shift_batch(
                {
                    "input_ids": raw["input_ids"],
                    "hidden_states": states[:, :-1].flatten(1),
                    "verifier_last_hidden_states": states[:, -1],
                    "loss_mask": raw["loss_mask"],
                    "lengths": torch.tensor([length]),
                    "position_ids": torch.arange(start, start + length),
                }
            )
        )
    out: dict[str, torch.Tensor] = {}
    for key in (
        "input_ids",
        "hidden_states",
        "verifier_last_hidden_states",
        "loss_mask",
        "position_ids",
    ):
        cat = torch.cat([p[key] for p in parts])
        pad = torch.zeros((seq_len - cat.shape[0], *cat.shape[1:]), dtype=cat.dtype)
        out[key] = torch.cat([cat, pad])[None]
    lengths = torch.cat([p["lengths"] for p in parts])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out["document_ids"] = torch.cat([doc, -torch.ones(seq_len - doc.shape[0], dtype=torch.long)])[
        None
    ]
    return out


def load_draft(folder: Path) -> Any:
    config = SpeculatorModelConfig.from_pretrained(str(folder))
    config.transformer_layer_config._attn_implementation = "sdpa"  # no flex attention on a CPU
    return SpeculatorModel.from_pretrained(str(folder), config=config)


class Run:
    """The model, its optimizer(s) and schedule(s), and one timed training step."""

    def __init__(self, settings: dict[str, Any], store: StoreReader, total_steps: int) -> None:
        self.settings, self.store = settings, store
        self.model = load_draft(Path(settings["init"]))
        self.model.train()
        opt_config = SimpleNamespace(
            optimizer="adamw", lr=settings["learning_rate"], weight_decay=settings["weight_decay"]
        )
        self.optimizers = build_optimizers(self.model, opt_config)
        # What upstream's --scheduler-warmup-ratio resolves to: int(total * ratio).
        warmup = int(total_steps * settings["warmup_ratio"])
        self.schedulers = [
            get_cosine_schedule_with_warmup(
                o, num_warmup_steps=warmup, num_training_steps=total_steps, num_cycles=0.5
            )
            for o in self.optimizers
        ]

    def step(self, row: list[list[int]]) -> tuple[float, float]:
        """Train on one row; return (seconds, loss)."""
        started = time.perf_counter()
        batch = row_batch(self.store, row, self.settings["seq_len"])
        for o in self.optimizers:
            o.zero_grad()
        _tokens, loss, _metrics = self.model(
            **batch,
            ttt_steps=self.settings["ttt_steps"],
            loss_config={"kl_div": (kl_div_loss, 1.0)},  # the fused loss needs Triton
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["max_grad_norm"])
        for o in self.optimizers:
            o.step()
        for s in self.schedulers:
            s.step()
        return time.perf_counter() - started, float(loss)


@torch.no_grad()
def first_loss(settings: dict[str, Any], store: StoreReader) -> float:
    """The initial draft's loss on the first row (no noise): compared with ours as a check."""
    model = load_draft(Path(settings["init"]))
    model.eval()
    batch = row_batch(store, settings["epochs"][0][0], settings["seq_len"])
    _tokens, loss, _metrics = model(
        **batch, ttt_steps=settings["ttt_steps"], loss_config={"kl_div": (kl_div_loss, 1.0)}
    )
    return float(loss)


def rows_in_order(settings: dict[str, Any]) -> Any:
    """The rows, epoch after epoch (the recorded epochs repeat if the run outlasts them)."""
    epoch = 0
    while True:
        yield from settings["epochs"][epoch % len(settings["epochs"])]
        epoch += 1


def main() -> None:
    work = Path(sys.argv[1])
    settings = json.loads((work / "settings.json").read_text())
    torch.manual_seed(settings["seed"])
    store = StoreReader(Path(settings["store"]))
    budget = float(settings["train_seconds"])
    check_loss = first_loss(settings, store)

    # Calibration on a throw-away copy of the draft (its steps are not counted or kept).
    probe = Run(settings, store, total_steps=100)
    rows = rows_in_order(settings)
    times = [probe.step(next(rows))[0] for _ in range(1 + CALIBRATION_STEPS)]
    step_s = min(times[1:])
    del probe
    planned = max(1, math.floor(budget / step_s))

    run = Run(settings, store, total_steps=planned)
    spent, steps, tokens, losses = 0.0, 0, 0, []
    rows = rows_in_order(settings)
    while steps < planned and spent < budget:
        row = next(rows)
        seconds, loss = run.step(row)
        spent += seconds
        steps += 1
        tokens += sum(piece[2] for piece in row)
        losses.append(loss)
        if steps % 10 == 0 or steps == planned:
            print(
                f"upstream step {steps}/{planned}: loss {loss:.3f}, {spent:.0f}/{budget:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    # The verifier as a local folder, as vLLM and `speculators check` will look for it.
    run.model.config.speculators_config.verifier.name_or_path = settings["verifier_name_or_path"]
    run.model.save_pretrained(settings["output"])
    result = {
        "first_loss": check_loss,
        "calibrated_seconds_per_step": step_s,
        "planned_steps": planned,
        "steps": steps,
        "train_seconds": spent,
        "tokens": tokens,
        "final_lr": run.schedulers[0].get_last_lr()[0],
        "losses": losses,
        "threads": torch.get_num_threads(),
        "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
    }
    (work / "upstream-result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
