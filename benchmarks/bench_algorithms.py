"""EAGLE-3, P-EAGLE and DFlash side by side: same store, same training seconds, served by vLLM.

Input: a finished ``speculators quickstart`` output folder (``--run DIR``): its hidden-state store
(the states all three read), draft vocabulary and settings. Each algorithm (``--algorithms``)
trains with ``speculators train`` on that store for the same wall-clock seconds
(``--train-seconds``; a short probe run measures each one's seconds per step, the real run takes
as many steps as fit), with the quickstart's schedule (cosine to 5 %, 5 % warm-up) and learning
rate. Then ``vllm serve`` runs, one server at a time: SmolLM2 alone, and each draft at each k
(``--k-values``, default 1, 3, 7), driven over HTTP at concurrency 1 with the first
``--num-prompts`` held-out ShareGPT prompts (``--max-new-tokens`` each, greedy).

Printed per algorithm and k: τ (vLLM's counters), acceptance per position, the cost of one round
(draft + verify) in verifier steps (seconds per round / seconds per token of the verifier
alone), the speed-up at concurrency 1 against the verifier alone (ratio of per-request median
output tokens/s, measured in the same run) and whether the output is the verifier's, token for
token. The machine's load average is printed with the table.

Goal (stated, not asserted): the best algorithm and k from the quickstart's budget decodes
**>= 1.5x the verifier alone at concurrency 1** in vLLM on the development CPU.

    .venv/bin/python benchmarks/bench_algorithms.py --run quickstart-output \
        [--train-seconds 600] [--algorithms eagle3,peagle,dflash] [--k-values 1,3,7] \
        [--num-prompts 8] [--max-new-tokens 96] [--work DIR [--reuse]] [--json OUT]
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
GOAL_SPEEDUP = 1.5
PROBE_STEPS = 6

#: algorithm -> ``--algo-opt`` values beyond the quickstart's (deep enough for k = 7)
ALGORITHMS: dict[str, list[str]] = {
    "eagle3": ["ttt_steps=3"],
    "peagle": ["num_depths=8"],
    "dflash": ["block_size=8", "max_anchors=64"],
}


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def train(name: str, run: Path, out: Path, steps: int) -> tuple[float, int] | str:
    """``speculators train --algorithm NAME`` for ``steps`` steps: (train seconds, steps), or
    the error line."""
    settings = json.loads((run / "report.json").read_text())["settings"]
    verifier = json.loads((run / "train" / "run_config.json").read_text())["verifier"]
    options = [flag for value in ALGORITHMS[name] for flag in ("--algo-opt", value)]
    command = [
        str(SPECULATORS), "train", "--algorithm", name, "--verifier", verifier,
        "--data", str(run / "data" / "store"), "--vocab", str(run / "data" / "vocab"),
        "--draft-vocab-size", str(settings["draft_vocab_size"]),
        "--output", str(out), "--overwrite", "--seq-len", str(settings["train_seq_len"]),
        "--learning-rate", str(settings["learning_rate"]), "--lr-scheduler", "cosine",
        "--warmup-ratio", "0.05", "--min-lr-ratio", "0.05", "--seed", str(settings["seed"]),
        "--max-steps", str(steps), "--num-epochs", "1000", "--val-fraction", "0.05",
        "--eval-every", "1000000", "--no-eval-per-epoch", "--no-save-per-epoch",
        "--save-every", "1000000", "--save-total-limit", "1", "--no-progress",
        "--no-console-log", *options,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"training failed: {_last_line(result)}"
    seconds = 0.0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        seconds = float(record.get("train_seconds", seconds))
    return seconds, steps


def train_for(name: str, run: Path, work: Path, budget: float, reuse: bool) -> dict[str, Any]:
    """Probe the seconds per step, then train for ``budget`` seconds' worth of steps (with
    ``reuse``, a finished ``run-NAME`` in ``work`` is measured as it is)."""
    final = work / f"run-{name}" / "final"
    if reuse and final.is_dir():
        records = [
            json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()
        ]
        timed = [r for r in records if "train_seconds" in r]
        return {
            "name": name,
            "final": final,
            "steps": int(timed[-1]["step"]),
            "train_seconds": float(timed[-1]["train_seconds"]),
        }
    probe = train(name, run, work / f"probe-{name}", PROBE_STEPS)
    if isinstance(probe, str):
        return {"name": name, "error": probe}
    per_step = probe[0] / PROBE_STEPS
    steps = max(PROBE_STEPS, int(budget / per_step))
    trained = train(name, run, work / f"run-{name}", steps)
    if isinstance(trained, str):
        return {"name": name, "error": trained}
    return {
        "name": name,
        "final": work / f"run-{name}" / "final",
        "steps": steps,
        "train_seconds": trained[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a quickstart output folder")
    parser.add_argument("--train-seconds", type=float, default=600.0)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--k-values", default="1,3,7")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--reuse", action="store_true", help="measure finished runs in --work instead of training"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from speculators_core import PluginHost
    from speculators_core.cli.serve import build_serve_command
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.evaluate.vllm_server import measure_server, verifier_argv

    run = args.run.resolve()
    if not (run / "report.json").is_file() or not (run / "data" / "store").is_dir():
        raise SystemExit(f"'{run}' is not a finished quickstart run; run 'speculators quickstart'")
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    k_values = [int(k) for k in args.k_values.split(",")]
    verifier = json.loads((run / "train" / "run_config.json").read_text())["verifier"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-algorithms-"))
    work.mkdir(parents=True, exist_ok=True)
    host = PluginHost()
    loads: list[float] = []
    try:
        trained = []
        for name in names:
            row = train_for(name, run, work, args.train_seconds, args.reuse)
            loads.append(os.getloadavg()[0])
            shown = row.get("error") or f"{row['steps']} steps, {row['train_seconds']:.0f} s"
            print(f"[{name}] {shown}", file=sys.stderr, flush=True)
            trained.append(row)

        tokenizer = AutoTokenizer.from_pretrained(verifier)
        texts = load_prompt_texts("sharegpt-heldout", args.num_prompts)
        prompts = render_prompts(texts, tokenizer, max_prompt_tokens=1024)
        (work / "logs").mkdir(exist_ok=True)
        common: dict[str, Any] = {"max_tokens": args.max_new_tokens, "log_dir": work / "logs"}
        started = time.perf_counter()
        first_draft = next((r["final"] for r in trained if "final" in r), None)
        if first_draft is None:
            raise SystemExit("no algorithm trained; nothing to serve")
        first = build_serve_command(first_draft, plugin_host=host, verifier=verifier, k=1)
        model = first.argv[first.argv.index("serve") + 1]
        alone = measure_server(
            "verifier", verifier_argv(first.argv), first.env, model, prompts, **common
        )
        base = alone.levels[1]
        step_seconds = base.wall_s / max(1, base.output_tokens)
        rows: list[dict[str, Any]] = []
        for row in trained:
            if "error" in row:
                rows.append(row)
                continue
            for k in k_values:
                command = build_serve_command(
                    row["final"], plugin_host=host, verifier=verifier, k=k
                )
                measured = measure_server(
                    f"{row['name']}-k{k}", command.argv, command.env, model, prompts, **common
                )
                level = measured.levels[1]
                drafts = measured.counters.drafts
                rows.append(
                    {
                        **{key: value for key, value in row.items() if key != "final"},
                        "k": k,
                        "tau": measured.counters.mean_acceptance_length,
                        "per_position": measured.counters.acceptance_per_position,
                        "round_in_verifier_steps": (level.wall_s / drafts) / step_seconds
                        if drafts
                        else None,
                        "speedup": level.tokens_per_s_median / base.tokens_per_s_median,
                        "identical": measured.outputs == alone.outputs,
                    }
                )
                loads.append(os.getloadavg()[0])
        serve_seconds = time.perf_counter() - started
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{len(names)} algorithms on {run}'s store, {args.train_seconds:.0f} s of training "
        f"each; vllm serve at concurrency 1, {args.num_prompts} held-out prompts x "
        f"{args.max_new_tokens} tokens, greedy; verifier alone "
        f"{base.tokens_per_s_median:.1f} tokens/s; serving took {serve_seconds:.0f} s; load "
        f"average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} ({os.cpu_count()} CPUs)\n"
    )
    print(
        "| algorithm | steps | k | τ (vLLM) | per position | round (verifier steps) | speed-up c=1 | lossless |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | {row['error']} | | | | | | |")
            continue
        per = " / ".join(f"{x:.2f}" for x in row["per_position"])
        cost = f"{row['round_in_verifier_steps']:.2f}" if row["round_in_verifier_steps"] else "-"
        print(
            f"| {row['name']} | {row['steps']} | {row['k']} | {row['tau']:.3f} | {per} | {cost} "
            f"| {row['speedup']:.2f}x | {'yes' if row['identical'] else 'NO'} |"
        )
    served = [r for r in rows if "speedup" in r]
    if served:
        best = max(served, key=lambda r: r["speedup"])
        verdict = "met" if best["speedup"] >= GOAL_SPEEDUP else "not met"
        print(
            f"\nbest: {best['name']} at k = {best['k']} ({best['speedup']:.2f}x); goal "
            f">= {GOAL_SPEEDUP}x at concurrency 1: {verdict}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
