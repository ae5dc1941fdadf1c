"""Sweep: what the quickstart's training stage can buy from the data its run made.

Input: a finished ``speculators quickstart`` output folder (``--run DIR``: its hidden-state store
``DIR/data/store`` and vocabulary ``DIR/data/vocab``). The store is split once, by sample index,
into a fixed validation set (every 20th conversation, answer tokens only) and a training set;
then each variant trains an EAGLE-3 draft with ``speculators train`` for the same number of
optimizer steps (``--max-steps``, the quickstart's plan by default) and is validated every
``--eval-every`` steps on that same set. Printed: per variant, the validation estimate of the
acceptance length ``1 + Σ full accuracy`` (k = 3) and the step-0 validation loss at each
validation, then a summary table. Steps, not seconds, are held equal, so the figures do not
depend on the load of the machine; the seconds each variant took are printed too.

Variants (``--variants``, comma-separated; default all):

* ``base``: the quickstart's settings (answer tokens supervised, AdamW lr 1e-3 cosine to 5%,
  5% warm-up, rows of 2,048 tokens, TTT 3 steps, uniform noise 0.05 on the verifier states);
* ``all-tokens``: prompt tokens supervised too (the verifier's distributions are valid targets
  at every position);
* ``lr3e-3`` / ``lr5e-4``: other peak learning rates;
* ``noise0.2``: uniform noise 0.2 on the verifier states (against memorisation);
* ``half`` / ``quarter``: every 2nd / 4th training conversation only (the data-size curve).

    .venv/bin/python benchmarks/bench_quickstart_sweep.py --run quickstart-output \
        [--max-steps 266] [--eval-every 26] [--variants base,half] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPECULATORS = Path(sys.executable).with_name("speculators")
#: One conversation in this many is held out for validation (index % VAL_EVERY == VAL_AT).
VAL_EVERY, VAL_AT = 20, 7

#: variant -> (training store key, extra ``speculators train`` flags)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("answers", []),
    "all-tokens": ("all-tokens", []),
    "lr3e-3": ("answers", ["--learning-rate", "3e-3"]),
    "lr5e-4": ("answers", ["--learning-rate", "5e-4"]),
    "noise0.2": ("answers", ["--algo-opt", "noise_std=0.2"]),
    "half": ("half", []),
    "quarter": ("quarter", []),
}


def split_store(source: Path, work: Path, keys: set[str]) -> dict[str, Path]:
    """Write the validation store and the training stores ``keys`` need; their paths by key."""
    import torch

    from speculators_core.data.store import ShardStore, ShardStoreWriter

    store = ShardStore.open(source)
    manifest = json.loads((source / "manifest.json").read_text())
    per_store = {"shard_size", "num_samples", "num_tokens", "num_supervised_tokens"}
    per_store |= {"sample_num_tokens", "shards", "format", "format_version"}
    fields = {
        ("dtype_name" if key == "dtype" else key): value
        for key, value in manifest.items()
        if key not in per_store
    }
    train = [i for i in range(len(store)) if i % VAL_EVERY != VAL_AT]
    val = [i for i in range(len(store)) if i % VAL_EVERY == VAL_AT]
    plans: dict[str, tuple[list[int], bool]] = {"val": (val, False)}
    if "answers" in keys:
        plans["answers"] = (train, False)
    if "all-tokens" in keys:
        plans["all-tokens"] = (train, True)
    if "half" in keys:
        plans["half"] = (train[::2], False)
    if "quarter" in keys:
        plans["quarter"] = (train[::4], False)
    paths: dict[str, Path] = {}
    for key, (indices, all_tokens) in plans.items():
        out = work / f"store-{key}"
        writer = ShardStoreWriter(
            out,
            run_settings={"sweep": key},
            shard_size=64,
            num_samples=len(indices),
            overwrite=True,
        )
        writer.start()
        for shard in range(writer.num_shards):
            samples = []
            for j in writer.shard_range(shard):
                sample = dict(store[indices[j]])
                if all_tokens:
                    sample["loss_mask"] = torch.ones_like(sample["loss_mask"])
                samples.append(sample)
            writer.write_shard(shard, samples, dtype=store.manifest.dtype)
        done = writer.finish(fields)
        print(
            f"[split] {key}: {done.num_samples} conversations, {done.num_supervised_tokens:,} "
            "supervised tokens",
            file=sys.stderr,
        )
        paths[key] = out
    return paths


def train_variant(
    name: str, store: Path, val: Path, run: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one variant; its validations and seconds."""
    settings = json.loads((run / "report.json").read_text()).get("settings", {})
    out = work / f"run-{name}"
    flags = VARIANTS[name][1]
    command = [
        str(SPECULATORS), "train", "--algorithm", "eagle3",
        "--verifier", str(json.loads((run / "train" / "run_config.json").read_text())["verifier"]),
        "--data", str(store), "--val-data", str(val), "--val-fraction", "0",
        "--vocab", str(run / "data" / "vocab"),
        "--draft-vocab-size", str(settings.get("draft_vocab_size", 4096)),
        "--output", str(out), "--overwrite",
        "--seq-len", str(settings.get("train_seq_len", 2048)),
        "--learning-rate", str(settings.get("learning_rate", 1e-3)),
        "--lr-scheduler", "cosine", "--warmup-ratio", "0.05", "--min-lr-ratio", "0.05",
        "--max-steps", str(args.max_steps), "--num-epochs", "1000",
        "--eval-every", str(args.eval_every), "--no-eval-per-epoch",
        "--no-save-per-epoch", "--save-every", "1000000", "--save-total-limit", "1",
        "--no-progress", "--no-console-log",
        "--algo-opt", f"ttt_steps={settings.get('algo_options', {}).get('ttt_steps', settings.get('ttt_steps', 3))}",
        *flags,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"variant {name} failed: {tail[0] if tail else result.returncode}")
    validations = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_est_accept_len" in record:
            validations.append(
                (int(record["step"]), record["val_est_accept_len"], record["val_loss_0"])
            )
    return {"name": name, "seconds": seconds, "validations": validations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a quickstart output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the run's plan")
    parser.add_argument("--eval-every", type=int, default=26)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()

    run = args.run.resolve()
    if not (run / "data" / "store" / "manifest.json").is_file():
        raise SystemExit(f"'{run}' has no finished data/store; run 'speculators quickstart' first")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.max_steps is None:
        report = json.loads((run / "report.json").read_text())
        args.max_steps = int(report["train"]["max_steps"])
    work = args.work or Path(tempfile.mkdtemp(prefix="qs-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stores = split_store(run / "data" / "store", work, {VARIANTS[n][0] for n in names})
        results = []
        for name in names:
            result = train_variant(name, stores[VARIANTS[name][0]], stores["val"], run, work, args)
            for step, tau, loss in result["validations"]:
                print(f"{name} step {step}: val tau est {tau:.3f}, val loss_0 {loss:.3f}")
            results.append(result)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n| variant | val τ est at step {args.max_steps} | val loss_0 | seconds |")
    print("|---|---|---|---|")
    for result in results:
        step, tau, loss = result["validations"][-1]
        print(
            f"| {result['name']} | {tau:.3f} (step {step}) | {loss:.3f} | {result['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
