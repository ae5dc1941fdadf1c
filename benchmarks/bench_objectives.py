"""Recipe benchmark: which objective, optimizer and norms buy the most acceptance per CPU-minute.

Input: a finished ``speculators quickstart`` output folder (``--run DIR``): its hidden-state store,
draft vocabulary and settings. Every variant trains an EAGLE-3 draft with ``speculators train`` on
that same store for the same number of optimizer steps (``--max-steps``; the quickstart's own
plan by default, so each variant gets the quickstart's training), with the quickstart's
schedule (cosine to 5 %, 5 % warm-up, rows of ``train_seq_len``), and is then measured the way
the quickstart's draft is: ``speculators eval --engine vllm`` on the same held-out ShareGPT
prompts (``--num-prompts``, 128 new tokens, greedy, k = 3), τ read from vLLM's counters.

Variants (``--variants``, comma-separated; default all):

* ``kl``: the quickstart's recipe (forward KL, AdamW, EAGLE-3.0 norms);
* ``rkl``, ``jsd``, ``tv``, ``ce``, ``nla``, ``lk``: the other objectives
  (``speculators objectives``), each alone;
* ``kl+lk``: ``--loss kl=0.5,lk=0.5``;
* ``muon``: forward KL with ``--optimizer muon``;
* ``norms3.1``: forward KL with the EAGLE-3.1 norms (``norm_before_fc``, ``norm_output``);
* ``curriculum``: ShareGPT's own answers first (``--sharegpt-samples`` conversations captured in
  one prefill pass, ``--stage1-steps`` steps), then the run's store from those weights
  (``init_from``);
* ``short-answers``: twice the run's prompts with answers of half the length, regenerated and
  recorded in one pass (about the same decoding time as the run's data).

The data levers cost data time the others do not: their rows show it ("extra data s"), and the
curriculum's training seconds include its first stage.

Prints one row per variant (τ, acceptance per position, the last validation estimate, training
seconds) with the machine's load average, and the goal (not asserted): τ ≥ 1.8 in vLLM from the
quickstart's 30-minute budget (about 1.5x at concurrency 1 on the development box).

    .venv/bin/python benchmarks/bench_objectives.py --run quickstart-output \
        [--max-steps N] [--variants kl,lk,muon] [--num-prompts 32] [--work DIR] [--json OUT] \
        [--sharegpt-samples 400] [--stage1-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPECULATORS = Path(sys.executable).with_name("speculators")
GOAL_TAU = 1.8

#: variant -> extra ``speculators train`` flags
VARIANTS: dict[str, list[str]] = {
    "kl": [],
    "rkl": ["--loss", "rkl"],
    "jsd": ["--loss", "jsd"],
    "tv": ["--loss", "tv"],
    "ce": ["--loss", "ce"],
    "nla": ["--loss", "nla"],
    "lk": ["--loss", "lk"],
    "kl+lk": ["--loss", "kl=0.5,lk=0.5"],
    "muon": ["--optimizer", "muon"],
    "norms3.1": ["--algo-opt", "norm_before_fc=true", "--algo-opt", "norm_output=true"],
    # data-diversity levers (see DataLevers): other data, the quickstart's recipe
    "curriculum": [],
    "short-answers": [],
}


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def train_run(
    run: Path, out: Path, store: Path, max_steps: int, flags: list[str]
) -> tuple[float, float | None] | str:
    """``speculators train`` on ``store`` with the run's recipe plus ``flags``.

    Returns (training seconds, last validation τ estimate), or the error line.
    """
    report = json.loads((run / "report.json").read_text())
    settings = report["settings"]
    verifier = json.loads((run / "train" / "run_config.json").read_text())["verifier"]
    ttt_steps = settings.get("algo_options", {}).get("ttt_steps", 3)
    command = [
        str(SPECULATORS), "train", "--algorithm", "eagle3", "--verifier", verifier,
        "--data", str(store), "--vocab", str(run / "data" / "vocab"),
        "--draft-vocab-size", str(settings["draft_vocab_size"]),
        "--output", str(out), "--overwrite", "--seq-len", str(settings["train_seq_len"]),
        "--learning-rate", str(settings["learning_rate"]), "--lr-scheduler", "cosine",
        "--warmup-ratio", "0.05", "--min-lr-ratio", "0.05", "--seed", str(settings["seed"]),
        "--max-steps", str(max_steps), "--num-epochs", "1000", "--val-fraction", "0.05",
        "--eval-every", str(max(1, max_steps // 4)), "--no-eval-per-epoch",
        "--no-save-per-epoch", "--save-every", "1000000", "--save-total-limit", "1",
        "--no-progress", "--no-console-log", "--algo-opt", f"ttt_steps={ttt_steps}",
        *flags,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return f"training failed: {_last_line(result)}"
    estimate = None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_est_accept_len" in record:
            estimate = float(record["val_est_accept_len"])
    return seconds, estimate


def train_variant(
    name: str, run: Path, work: Path, max_steps: int, data: DataLevers
) -> dict[str, Any]:
    """Train one variant; its final folder, seconds (data + training) and last validation."""
    out = work / f"run-{name}"
    store = run / "data" / "store"
    flags = list(VARIANTS.get(name, []))
    data_seconds = 0.0
    stage1_seconds = 0.0
    if name == "curriculum":
        built = data.sharegpt_store()
        if isinstance(built, str):
            return {"name": name, "error": built}
        sharegpt, data_seconds = built
        stage1 = train_run(run, work / "run-curriculum-stage1", sharegpt, data.stage1_steps, [])
        if isinstance(stage1, str):
            return {"name": name, "error": f"stage 1: {stage1}"}
        stage1_seconds = stage1[0]
        flags = ["--algo-opt", f"init_from={work / 'run-curriculum-stage1' / 'final'}"]
    elif name == "short-answers":
        built = data.short_answer_store()
        if isinstance(built, str):
            return {"name": name, "error": built}
        store, data_seconds = built
    trained = train_run(run, out, store, max_steps, flags)
    if isinstance(trained, str):
        return {"name": name, "error": trained}
    seconds, estimate = trained
    return {
        "name": name,
        "final": out / "final",
        "seconds": seconds + stage1_seconds,
        "extra_data_seconds": data_seconds,
        "val_estimate": estimate,
    }


class DataLevers:
    """The data-diversity variants' extra stores, built once in the scratch folder.

    * ``curriculum``: ShareGPT's own answers (``sharegpt_samples`` conversations of the training
      split not among the run's, all turns) captured by the verifier in one prefill pass (no
      decoding: about 3x the tokens per second of regeneration on a 2-core CPU), trained on for
      ``stage1_steps``, then the run's own store (the verifier's answers) from those weights.
    * ``short-answers``: twice the run's prompts, answers regenerated at half its
      ``max_new_tokens`` (about the same decoding time), recorded in the same one-pass way.
    """

    def __init__(self, run: Path, work: Path, sharegpt_samples: int, stage1_steps: int) -> None:
        self.run = run
        self.work = work
        self.sharegpt_samples = sharegpt_samples
        self.stage1_steps = stage1_steps
        self.settings = json.loads((run / "report.json").read_text())["settings"]
        self.verifier = json.loads((run / "train" / "run_config.json").read_text())["verifier"]

    def _speculators(self, *args: str) -> str | None:
        result = subprocess.run(
            [str(SPECULATORS), *args], capture_output=True, text=True, check=False
        )
        return None if result.returncode == 0 else _last_line(result)

    def sharegpt_store(self) -> tuple[Path, float] | str:
        """The store of ShareGPT's own answers and the seconds it took (0 when reused)."""
        store = self.work / "sharegpt-store"
        if store.is_dir():
            return store, 0.0
        started = time.perf_counter()
        prepared = self.work / "sharegpt-prepared"
        # another shuffle seed than the run's: other conversations than the regenerated ones
        error = self._speculators(
            "data", "prepare", "--verifier", self.verifier, "--data", "sharegpt",
            "--output", str(prepared), "--overwrite", "--seed", str(self.settings["seed"] + 1),
            "--max-samples", str(self.sharegpt_samples),
            "--seq-length", str(self.settings["seq_length"]),
        ) or self._speculators(
            "data", "hidden-states", "--verifier", self.verifier, "--prepared", str(prepared),
            "--output", str(store), "--algorithm", "eagle3", "--overwrite",
        )  # fmt: skip
        if error is not None:
            return f"ShareGPT store failed: {error}"
        return store, time.perf_counter() - started

    def short_answer_store(self) -> tuple[Path, float] | str:
        """Twice the prompts at half the answer length, and the seconds it took."""
        store = self.work / "short-store"
        if store.is_dir():
            return store, 0.0
        started = time.perf_counter()
        error = self._speculators(
            "data", "regenerate", "--verifier", self.verifier, "--data", "sharegpt",
            "--output", str(self.work / "short-prepared"), "--overwrite",
            "--seed", str(self.settings["seed"]),
            "--max-samples", str(2 * self.settings["samples"]),
            "--seq-length", str(self.settings["seq_length"]),
            "--max-new-tokens", str(max(1, self.settings["max_new_tokens"] // 2)),
            "--max-turns", "1", "--store", str(store), "--algorithm", "eagle3",
            "--batch-size", "64",  # the quickstart's one-pass batch
        )  # fmt: skip
        if error is not None:
            return f"short-answer store failed: {error}"
        return store, time.perf_counter() - started


def measure(variant: dict[str, Any], run: Path, num_prompts: int) -> None:
    """τ of the variant's draft in vLLM on the held-out prompts (the quickstart's measurement)."""
    settings = json.loads((run / "report.json").read_text())["settings"]
    verifier = json.loads((run / "train" / "run_config.json").read_text())["verifier"]
    out = Path(variant["final"]).parent / "eval"
    command = [
        str(SPECULATORS), "eval", str(variant["final"]), "--verifier", verifier,
        "--engine", "vllm", "--num-prompts", str(num_prompts), "-k", str(settings["k"]),
        "--max-new-tokens", str(settings["eval_max_new_tokens"]), "--no-baseline",
        "--output", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        variant["error"] = f"vLLM evaluation failed: {_last_line(result)}"
        return
    (evaluated,) = json.loads((out / "eval.json").read_text())["results"]
    variant["tau"] = evaluated["mean_acceptance_length"]
    variant["per_position"] = evaluated["acceptance_rate_per_position"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a quickstart output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the run's plan")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--sharegpt-samples", type=int, default=400, help="curriculum: ShareGPT conversations"
    )
    parser.add_argument(
        "--stage1-steps",
        type=int,
        default=None,
        help="curriculum: stage-1 steps (default: a third)",
    )
    args = parser.parse_args()

    run = args.run.resolve()
    if not (run / "report.json").is_file() or not (run / "data" / "store").is_dir():
        raise SystemExit(f"'{run}' is not a finished quickstart run; run 'speculators quickstart'")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    report = json.loads((run / "report.json").read_text())
    max_steps = args.max_steps or int(report["train"]["max_steps"])
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    work.mkdir(parents=True, exist_ok=True)
    levers = DataLevers(
        run, work, args.sharegpt_samples, args.stage1_steps or max(1, max_steps // 3)
    )
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    try:
        for name in names:
            variant = train_variant(name, run, work, max_steps, levers)
            if "error" not in variant:
                measure(variant, run, args.num_prompts)
            loads.append(os.getloadavg()[0])
            shown = (
                variant.get("error")
                or f"tau {variant['tau']:.3f} ({variant['seconds']:.0f} s of training)"
            )
            print(f"[{name}] {shown}", file=sys.stderr, flush=True)
            rows.append(variant)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{len(rows)} variants, {max_steps} optimizer steps each on {run}'s store; vLLM tau on "
        f"{args.num_prompts} held-out prompts, k = {report['settings']['k']}, greedy; load "
        f"average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
        f"({os.cpu_count()} CPUs)\n"
    )
    print("| variant | τ (vLLM) | per position | val τ est | training s | extra data s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | {row['error']} | | | | |")
            continue
        per = " / ".join(f"{x:.3f}" for x in row["per_position"])
        estimate = f"{row['val_estimate']:.3f}" if row["val_estimate"] is not None else "-"
        print(
            f"| {row['name']} | {row['tau']:.3f} | {per} | {estimate} | {row['seconds']:.0f} "
            f"| {row['extra_data_seconds']:.0f} |"
        )
    best = max((r for r in rows if "tau" in r), key=lambda r: r["tau"], default=None)
    if best is not None:
        verdict = "met" if best["tau"] >= GOAL_TAU else "not met"
        print(f"\nbest: {best['name']} (τ {best['tau']:.3f}); goal τ ≥ {GOAL_TAU}: {verdict}")
    if args.json is not None:
        args.json.write_text(
            json.dumps([{k: str(v) if k == "final" else v for k, v in r.items()} for r in rows])
        )


if __name__ == "__main__":
    main()
