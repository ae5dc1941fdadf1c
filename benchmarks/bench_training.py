"""Benchmark: EAGLE-3 training speed and memory on this CPU, this project vs upstream speculators.

A SmolLM2-shaped EAGLE-3 draft (hidden 576, 1 decoder layer, draft vocabulary of 8k tokens,
3 TTT steps, verifier SmolLM2-135M-Instruct) is trained on the same packed rows, from the same
initial weights, by:

1. ``ours/trainer``: this project's ``Trainer`` (packing, collation, AdamW, clipping, scheduler,
   logging; the EAGLE-3 plugin's ``training_step``), timed per optimizer step;
2. ``ours/model-step``: the EAGLE-3 plugin alone: ``training_step`` + backward + clip + AdamW on
   pre-built batches;
3. ``upstream/model-step``: upstream ``speculators==0.9.0`` (in its own venv) doing the same:
   its ``Eagle3DraftModel.forward`` (SDPA attention, its eager KL loss: the default fused one
   needs Triton) + backward + clip + its own
   ``build_optimizers`` AdamW + its linear warm-up scheduler, on batches built with its own
   ``shift_batch`` from the same rows.

Upstream's ``Trainer`` cannot run on a CPU: it moves the model to ``local_rank`` (``cuda:0``)
and autocasts on the ``cuda`` device type; so its own model step is timed instead, as the
comparison for both of our numbers. Everything runs in float32 (bf16 matmuls are slower than
fp32 on CPUs without AVX512-BF16). Each side runs in its own process, the sides alternating
for ``--rounds`` rounds, so peak RSS is per side; the first steps are warm-up and not timed, and
each timed step counts with its best time over the rounds (other processes on a shared machine
only ever slow a step down). Both sides start from the same
weights on the same first batch, so their first losses must agree: the script prints them as a
check that the configuration is the same.

Samples are synthetic by default (random token ids and hidden states with SmolLM2's shapes and
realistic lengths: speed does not depend on the values) or read from a real store with
``--store`` (captured with the EAGLE-3 spec of SmolLM2, layers 2, 15, 27, 30).

    .venv/bin/python benchmarks/bench_training.py [--steps 4] [--rounds 2] [--seq-len 2048] [--store DIR]
        [--upstream-venv .cache/upstream-venv]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM_VENV = REPO / ".cache" / "upstream-venv"


# ------------------------------------------------------------------------------------------
# set-up (parent process, our venv)
# ------------------------------------------------------------------------------------------


def _synthetic_samples(num: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    """Samples with ShareGPT-like lengths (a third to a full row) and SmolLM2-shaped states."""
    import torch

    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num):
        length = int(torch.randint(seq_len // 3, seq_len + 1, (1,), generator=g))
        prompt = int(torch.randint(length // 8, length // 2, (1,), generator=g))
        mask = torch.zeros(length, dtype=torch.long)
        mask[prompt:] = 1
        samples.append(
            {
                "input_ids": torch.randint(0, vocab, (length,), generator=g),
                "loss_mask": mask,
                "hidden_states": torch.randn(length, 4, 576, generator=g).to(torch.bfloat16),
            }
        )
    return samples


def _store_samples(store: Path, num: int) -> list[dict[str, Any]]:
    from speculators_core.data.store import ShardStore

    data = ShardStore.open(store)
    return [data[i] for i in range(min(num, len(data)))]


def _save_samples(samples: list[dict[str, Any]], path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    lengths = [len(s["input_ids"]) for s in samples]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    save_file(
        {
            "input_ids": torch.cat([s["input_ids"] for s in samples]).long(),
            "loss_mask": torch.cat([s["loss_mask"] for s in samples]).long(),
            "hidden_states": torch.cat([s["hidden_states"] for s in samples]).contiguous(),
            "offsets": offsets,
        },
        str(path),
    )


def prepare(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write samples, the initial draft and the row plan into ``work``; return the settings."""
    import torch

    from speculators_core.plugins import get_host
    from speculators_core.train import RunPlan

    verifier = Path(opts.verifier) if opts.verifier else None
    if verifier is None:
        from speculators_core.assets import smollm2_path

        verifier = smollm2_path()
    vocab = json.loads((verifier / "config.json").read_text())["vocab_size"]
    # Enough samples for warm-up + timed steps (about 1.5 samples fill a row).
    needed = 2 * (opts.warmup + opts.steps) + 4
    if opts.store:
        samples = _store_samples(Path(opts.store), needed)
        source = f"store {opts.store}"
    else:
        samples = _synthetic_samples(needed, opts.seq_len, vocab, seed=0)
        source = "synthetic (random ids and hidden states, SmolLM2 shapes)"
    _save_samples(samples, work / "samples.safetensors")

    counts = torch.zeros(vocab, dtype=torch.long)
    for s in samples:
        counts += torch.bincount(s["input_ids"][s["loss_mask"] > 0], minlength=vocab)
    counts += 1  # every id is a candidate; the most frequent supervised ones win
    model_cls = get_host().algorithm("eagle3").model_class
    torch.manual_seed(0)
    draft = model_cls.from_verifier(
        verifier,
        num_layers=1,
        draft_vocab_size=opts.draft_vocab_size,
        token_counts=counts,
        ttt_steps=opts.ttt_steps,
        noise_std=0.0,  # upstream adds noise in its data pipeline, not in the model step
        attn_implementation="sdpa",
    )
    draft.save_pretrained(work / "draft")

    lengths = [len(s["input_ids"]) for s in samples]
    plan = RunPlan(
        lengths,
        list(range(len(samples))),
        seq_len=opts.seq_len,
        micro_batch_rows=1,
        grad_accum_steps=1,
        world_size=1,
        seed=opts.seed,
    )
    rows = plan.epoch_rows(0)[: opts.warmup + opts.steps]
    if len(rows) < opts.warmup + opts.steps:
        raise SystemExit(f"only {len(rows)} rows from {len(samples)} samples; pass more samples")
    settings = {
        "verifier": str(verifier),
        "seq_len": opts.seq_len,
        "warmup": opts.warmup,
        "steps": opts.steps,
        "ttt_steps": opts.ttt_steps,
        "seed": opts.seed,
        "learning_rate": 1e-4,
        "weight_decay": 0.01,
        "source": source,
        "num_samples": len(samples),
        "rows": [[[p.sample, p.start, p.length] for p in row] for row in rows],
        "draft_vocab_size": opts.draft_vocab_size,
    }
    (work / "settings.json").write_text(json.dumps(settings))
    return settings


# ------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _FileSource:
    """The benchmark's samples as a trainer data source."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        data = load_file(str(path))
        self.ids, self.mask, self.states = (
            data["input_ids"],
            data["loss_mask"],
            data["hidden_states"],
        )
        self.offsets = data["offsets"].tolist()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def num_tokens(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return {
            "input_ids": self.ids[lo:hi],
            "loss_mask": self.mask[lo:hi],
            "hidden_states": self.states[lo:hi],
        }


def _load_draft(settings: dict[str, Any], work: Path) -> Any:
    from speculators_core.loading import load_speculator

    model = load_speculator(work / "draft", verifier=settings["verifier"])
    # Training-only settings are not saved with a checkpoint: set them as prepared.
    model.configure_training(
        ttt_steps=settings["ttt_steps"], noise_std=0.0, attn_implementation="sdpa"
    )
    return model


def child_ours_trainer(work: Path) -> dict[str, Any]:
    """Our Trainer, timed from on_step_begin to on_step_end of each step after warm-up."""
    from speculators_core.train import Trainer, TrainerCallback, TrainingArguments

    settings = json.loads((work / "settings.json").read_text())
    model = _load_draft(settings, work)
    source = _FileSource(work / "samples.safetensors")
    total = settings["warmup"] + settings["steps"]
    args = TrainingArguments(
        output_dir=str(work / "ours-run"),
        num_epochs=1,
        max_steps=total,
        seq_len=settings["seq_len"],
        seed=settings["seed"],
        val_fraction=0.0,
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        log_every=1,
        save_per_epoch=False,
        progress=False,
        console_log=False,
        jsonl_log=False,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    trainer = Trainer(model, args, source, callbacks=[timer])
    planned = [
        [[p.sample, p.start, p.length] for p in row] for row in trainer.plan.epoch_rows(0)[:total]
    ]
    if planned != settings["rows"]:
        raise SystemExit("the trainer's row plan differs from the benchmark's")
    result = trainer.train()
    losses = [r["loss"] for r in result.state.log_history if "loss" in r]
    tokens = sum(sum(p[2] for p in row) for row in settings["rows"][settings["warmup"] :])
    return {
        "side": "ours/trainer",
        "tokens": tokens,
        "times": timer.times,
        "first_loss": losses[0],
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_ours_step(work: Path) -> dict[str, Any]:
    """The EAGLE-3 plugin's training_step + backward + clip + AdamW, on pre-built batches."""
    import torch

    from speculators_core.train import FeatureShape, Piece, collate_rows
    from speculators_core.train.arguments import TrainingArguments
    from speculators_core.train.optim import build_optimizer, build_scheduler

    settings = json.loads((work / "settings.json").read_text())
    model = _load_draft(settings, work)
    model.train()
    source = _FileSource(work / "samples.safetensors")
    feature = FeatureShape(4, 576, source.states.dtype)
    batches = [
        collate_rows([[Piece(*p) for p in row]], source, settings["seq_len"], feature)
        for row in settings["rows"]
    ]
    args = TrainingArguments(
        learning_rate=settings["learning_rate"], weight_decay=settings["weight_decay"]
    )
    total = len(batches)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    times, losses = [], []
    for batch in batches:
        started = time.perf_counter()
        out = model.training_step(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(out.loss))
    tokens = sum(sum(p[2] for p in row) for row in settings["rows"][settings["warmup"] :])
    return {
        "side": "ours/model-step",
        "tokens": tokens,
        "times": times,
        "first_loss": losses[0],
        "peak_rss_mb": _peak_rss_mb(),
    }


#: Run by upstream's venv python: its model step on batches built with its own shift_batch.
UPSTREAM_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.losses.eager import kl_div_loss
from speculators.models.eagle3.data import shift_batch
from speculators.train.optimizers import build_optimizers
from transformers import get_linear_schedule_with_warmup

work = Path(sys.argv[1])
settings = json.loads((work / "settings.json").read_text())
data = load_file(str(work / "samples.safetensors"))
offsets = data["offsets"].tolist()
T = settings["seq_len"]

def piece_batch(sample, start, length):
    lo = offsets[sample] + start
    hs = data["hidden_states"][lo : lo + length].float()
    return shift_batch({
        "input_ids": data["input_ids"][lo : lo + length],
        "hidden_states": hs[:, :3].flatten(1),
        "verifier_last_hidden_states": hs[:, 3],
        "loss_mask": data["loss_mask"][lo : lo + length],
        "lengths": torch.tensor([length]),
        "position_ids": torch.arange(start, start + length),
    })

def row_batch(row):
    parts = [piece_batch(*p) for p in row]
    out = {}
    for key in ("input_ids", "hidden_states", "verifier_last_hidden_states", "loss_mask", "position_ids"):
        cat = torch.cat([p[key] for p in parts])
        pad = torch.zeros((T - cat.shape[0], *cat.shape[1:]), dtype=cat.dtype)
        out[key] = torch.cat([cat, pad])[None]
    lengths = torch.cat([p["lengths"] for p in parts])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out["document_ids"] = torch.cat([doc, -torch.ones(T - doc.shape[0], dtype=torch.long)])[None]
    return out

config = SpeculatorModelConfig.from_pretrained(str(work / "draft"))
config.transformer_layer_config._attn_implementation = "sdpa"  # no flex attention on a CPU
model = SpeculatorModel.from_pretrained(str(work / "draft"), config=config)
model.train()
batches = [row_batch(row) for row in settings["rows"]]
opt_config = SimpleNamespace(optimizer="adamw", lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
optimizers = build_optimizers(model, opt_config)
total = len(batches)
schedulers = [get_linear_schedule_with_warmup(o, num_warmup_steps=max(1, total // 100), num_training_steps=total) for o in optimizers]
times, losses = [], []
for batch in batches:
    started = time.perf_counter()
    for o in optimizers:
        o.zero_grad()
    # The eager loss: upstream's default fused one needs Triton, which has no CPU backend.
    _tokens, loss, _metrics = model(
        **batch, ttt_steps=settings["ttt_steps"], loss_config={"kl_div": (kl_div_loss, 1.0)}
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for o in optimizers:
        o.step()
    for s in schedulers:
        s.step()
    times.append(time.perf_counter() - started)
    losses.append(float(loss))
tokens = sum(sum(p[2] for p in row) for row in settings["rows"][settings["warmup"]:])
print(json.dumps({
    "side": "upstream/model-step",
    "tokens": tokens,
    "times": times,
    "first_loss": losses[0],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def _run_child(command: list[str], label: str) -> dict[str, Any] | None:
    print(f"running {label} ...", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env.setdefault("TQDM_DISABLE", "1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"{label} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--seq-len", type=int, default=2048, help="tokens per packed row (1 row per step)"
    )
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--ttt-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verifier", default=None, help="verifier folder (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--store", default=None, help="a real EAGLE-3 store of the verifier (default: synthetic)"
    )
    parser.add_argument(
        "--upstream-venv",
        default=os.environ.get("SPECULATORS_UPSTREAM_VENV", str(DEFAULT_UPSTREAM_VENV)),
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; each step's best time counts"
    )
    parser.add_argument("--work", default=None, help="keep the work files here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.child:
        work = Path(opts.work)
        run = {"ours-trainer": child_ours_trainer, "ours-step": child_ours_step}[opts.child]
        print(json.dumps(run(work)))
        return

    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = prepare(opts, work)
    upstream_python = Path(opts.upstream_venv) / "bin" / "python"
    if not upstream_python.exists():
        print(
            f"upstream venv not found at {upstream_python.parent.parent}; make it with "
            "plugins/eagle3/tests/upstream/setup_upstream_venv.sh",
            file=sys.stderr,
        )
    commands = {
        "ours/trainer": [sys.executable, __file__, "--child", "ours-trainer", "--work", str(work)],
        "ours/model-step": [sys.executable, __file__, "--child", "ours-step", "--work", str(work)],
        "upstream/model-step": [str(upstream_python), "-c", UPSTREAM_CHILD, str(work)],
    }
    if not upstream_python.exists():
        del commands["upstream/model-step"]
    # Sides alternate, round after round; each row's time is its best over the rounds, which
    # keeps interference from other processes on a shared machine out of the comparison.
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in commands}
    for round_index in range(opts.rounds):
        for side, command in commands.items():
            got = _run_child(command, f"{side} (round {round_index + 1}/{opts.rounds})")
            if got:
                runs[side].append(got)
    results = []
    for side, side_runs in runs.items():
        if not side_runs:
            continue
        timed = [
            min(r["times"][i] for r in side_runs)
            for i in range(settings["warmup"], len(side_runs[0]["times"]))
        ]
        results.append(
            {
                "side": side,
                "tokens": side_runs[0]["tokens"],
                "seconds": sum(timed),
                "first_loss": side_runs[0]["first_loss"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
            }
        )

    import torch

    print()
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work skews these timings"
        )
    print(
        f"EAGLE-3 draft for {Path(settings['verifier']).name}: hidden 576, 1 layer, draft vocab "
        f"{settings['draft_vocab_size']}, TTT {settings['ttt_steps']}, rows of {settings['seq_len']} "
        f"tokens, 1 row per step, float32, AdamW lr 1e-4, {torch.get_num_threads()} threads"
    )
    print(
        f"samples: {settings['source']}; {settings['warmup']} warm-up + {settings['steps']} timed "
        f"steps per side, best of {opts.rounds} alternating round(s) per step"
    )
    print(f"{'side':<22}{'tokens/s':>10}{'s/step':>9}{'peak RSS MB':>13}{'first loss':>12}")
    for r in results:
        print(
            f"{r['side']:<22}{r['tokens'] / r['seconds']:>10.1f}{r['seconds'] / settings['steps']:>9.2f}"
            f"{r['peak_rss_mb']:>13.0f}{r['first_loss']:>12.4f}"
        )
    by_side = {r["side"]: r for r in results}
    up = by_side.get("upstream/model-step")
    if up:
        print(
            "upstream's Trainer cannot run on a CPU (it moves the model to cuda:0 and autocasts on "
            "'cuda'); its own model step (forward + backward + clip + AdamW) is the comparison"
        )
        up_speed = up["tokens"] / up["seconds"]
        for side in ("ours/trainer", "ours/model-step"):
            if side in by_side:
                r = by_side[side]
                speed = r["tokens"] / r["seconds"]
                print(
                    f"ratio {side} / upstream model step: {speed / up_speed:.2f}x tokens/s "
                    f"(goal >= 1.5x), {r['peak_rss_mb'] / up['peak_rss_mb']:.2f}x peak RSS"
                )


if __name__ == "__main__":
    main()
