"""Benchmark: acceptance length τ in vLLM of our EAGLE-3 draft vs upstream's, same data and budget.

Input: a ``speculators quickstart`` output folder (``--run DIR``) with its data (hidden-state
store of SmolLM2 layers 2, 15, 27, 30 in ``DIR/data/store``, draft vocabulary in
``DIR/data/vocab``) and, when finished, our trained draft in ``DIR/speculator``.

1. **Upstream's draft.** Upstream ``speculators==0.9.0`` (in its own venv) trains its EAGLE-3
   draft with our run's configuration: the same initial weights (our run's draft is rebuilt as
   the quickstart built it, seed included, and saved in the speculators format, which upstream
   loads), so the same 1 decoder layer, draft vocabulary (our ``d2t``/``t2d``), norms and frozen
   embeddings/``lm_head``; TTT 3 steps; AdamW at our learning rate and weight decay, gradient
   clipping at 1.0; the cosine schedule with our warm-up ratio that upstream's
   ``--scheduler-type cosine`` builds (it decays to 0, ours to 5% of the peak); float32. It
   trains on the very rows our trainer packed (our run's plan rebuilt: same train/validation
   split, same rows of ``train_seq_len`` tokens, same order epoch after epoch), each row as
   upstream's collate makes it (``shift_batch`` per sample), for the same training seconds as
   ours: our run's ``train_seconds`` (the time of its optimizer steps, batch building included;
   validation and checkpoints excluded), or ``--train-seconds``. Upstream's ``Trainer`` cannot
   run on a CPU (it moves the model to ``cuda:0`` and autocasts on ``cuda``), so its training
   step is driven by ``upstream_eagle3_train.py`` with upstream's own model forward (SDPA
   attention, eager KL loss: the fused one needs Triton), optimizer builder and scheduler; see
   that file. Like our quickstart, upstream's step count (and so its schedule) is fixed by a
   few calibration steps; it stops at that count or at the budget, whichever comes first.
   Upstream 0.9.0 has no hidden-state noise; ours trains with uniform noise of 0.05.
2. Upstream's draft is saved by its own ``save_pretrained`` and linted by our
   ``speculators check`` (findings are printed, not fatal).
3. Both drafts decode the quickstart's held-out prompts (the first ``--num-prompts`` ShareGPT
   held-out prompts, chat template of SmolLM2, at most 1024 prompt tokens) in vLLM for CPU, in
   one worker process, k = 3 (the run's k), greedy, ``--max-new-tokens`` new tokens;
   τ = mean acceptance length = 1 + accepted / drafting rounds, from vLLM's counters.
4. A table of both sides (training seconds, optimizer steps, tokens trained, τ, acceptance per
   draft position) and the ratio τ ours / τ upstream against the goal of 1.15x.

Both initial drafts' losses on the first row are printed as a check that the two start from
the same configuration (they agree to float32 rounding when they do).

    .venv/bin/python benchmarks/bench_tau_vs_upstream.py --run DIR [--train-seconds S]
        [--num-prompts 32] [--max-new-tokens 128] [--json PATH] [--work DIR]
        [--upstream-venv .cache/upstream-venv]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM_VENV = REPO / ".cache" / "upstream-venv"
UPSTREAM_SCRIPT = Path(__file__).resolve().parent / "upstream_eagle3_train.py"
#: Goal of issue 7: τ ours >= 1.15 x τ upstream.
GOAL = 1.15


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# our run
# ------------------------------------------------------------------------------------------


def our_train_seconds(run: Path, stages: dict[str, Any]) -> float | None:
    """Seconds of our run's optimizer steps: its final ``train_seconds``, else the last logged."""
    final = stages.get("train", {}).get("final_metrics", {})
    if "train_seconds" in final:
        return float(final["train_seconds"])
    found = None
    metrics = run / "train" / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "train_seconds" in record:
                found = float(record["train_seconds"])
    return found


def prepare(run: Path, work: Path, train_seconds: float) -> dict[str, Any]:
    """Rebuild our run's initial draft and row plan; write what upstream's side needs."""
    import torch

    from speculators_core.assets import resolve_verifier_path
    from speculators_core.quickstart.pipeline import _run_config
    from speculators_core.quickstart.settings import QuickstartSettings
    from speculators_core.train import collate_rows
    from speculators_core.train.launch import prepare_run

    recorded = json.loads((run / "quickstart.json").read_text())
    fields = dict(recorded["settings"])
    if "ttt_steps" in fields:  # recorded before the settings carried algo_options
        fields.setdefault("algo_options", {})["ttt_steps"] = fields.pop("ttt_steps")
    settings = QuickstartSettings(**fields)
    if settings.algorithm != "eagle3":
        raise SystemExit(f"{run} trained '{settings.algorithm}'; this benchmark compares eagle3")
    from speculators_core.plugins.host import get_host

    # The options the quickstart trained with: the recorded ones completed as it completes them.
    settings = settings.with_algorithm(get_host().algorithm(settings.algorithm))
    stages = recorded.get("stages", {})
    verifier = resolve_verifier_path(settings.verifier)
    store, vocab = run / "data" / "store", run / "data" / "vocab"
    if not store.is_dir() or not vocab.is_dir():
        raise SystemExit(
            f"{run} has no data/store or data/vocab; let the quickstart finish its data"
        )
    plan = stages.get("train-plan", {})
    config = _run_config(
        settings,
        verifier,
        store,
        vocab,
        work / "ours-replica",  # never written: the run is only prepared, not trained
        max_steps=int(plan.get("max_steps", 1)),
        steps_per_epoch=int(plan.get("steps_per_epoch", 1)),
        checkpoint_every=10**9,
        validate_every=10**9,
        resume=False,
    )
    prepared = prepare_run(config)  # seeds and builds the draft exactly as the quickstart did
    trainer, args = prepared.trainer, config.training
    if args.micro_batch_rows != 1 or args.grad_accum_steps != 1 or trainer.ctx.world_size != 1:
        raise SystemExit("this benchmark assumes one packed row per optimizer step")
    recorded_plan = _recorded_plan(run)
    if recorded_plan and (
        recorded_plan.get("train_samples") != len(trainer.plan.train_indices)
        or recorded_plan.get("rows_per_epoch") != len(trainer.plan.epoch_rows(0))
    ):
        raise SystemExit(
            "the rebuilt row plan differs from the one recorded in train/run_config.json"
        )

    # Enough epochs of rows for upstream's side: our step count twice over (upstream's steps are
    # not faster than ours), at least two epochs; the child repeats them if it needs more.
    ours_steps = int(stages.get("train", {}).get("steps", plan.get("max_steps", 1)))
    per_epoch = max(1, len(trainer.plan.epoch_rows(0)))
    epochs = max(2, math.ceil(2 * ours_steps / per_epoch) + 1)
    rows = [
        [[[p.sample, p.start, p.length] for p in row] for row in trainer.plan.epoch_rows(e)]
        for e in range(epochs)
    ]

    model = prepared.model
    model.save_pretrained(work / "init")
    model.eval()  # the check loss: no noise
    with torch.no_grad():
        first_row = trainer.plan.epoch_rows(0)[0]
        batch = collate_rows([first_row], trainer.train_data, args.seq_len, trainer.feature)
        our_first_loss = float(model.training_step(batch).loss)

    child = {
        "store": str(store),
        "epochs": rows,
        "seq_len": args.seq_len,
        "ttt_steps": int(config.algo_options["ttt_steps"]),
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio,
        "max_grad_norm": args.max_grad_norm if args.max_grad_norm is not None else math.inf,
        "seed": args.seed,
        "init": str(work / "init"),
        "output": str(work / "upstream-draft"),
        "verifier_name_or_path": str(verifier),
        "train_seconds": train_seconds,
    }
    (work / "settings.json").write_text(json.dumps(child))
    return {
        "settings": settings,
        "verifier": verifier,
        "stages": stages,
        "our_first_loss": our_first_loss,
        "our_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lr_scheduler": args.lr_scheduler,
        "min_lr_ratio": args.min_lr_ratio,
        "rows_per_epoch": per_epoch,
        "train_samples": len(trainer.plan.train_indices),
    }


def _recorded_plan(run: Path) -> dict[str, Any] | None:
    saved = run / "train" / "run_config.json"
    return json.loads(saved.read_text()).get("plan") if saved.is_file() else None


# ------------------------------------------------------------------------------------------
# upstream's side, check and evaluation
# ------------------------------------------------------------------------------------------


def train_upstream(upstream_python: Path, work: Path) -> dict[str, Any]:
    """Run ``upstream_eagle3_train.py`` in upstream's venv; its progress goes to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env.setdefault("TQDM_DISABLE", "1")
    proc = subprocess.run(
        [str(upstream_python), str(UPSTREAM_SCRIPT), str(work)],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr.splitlines():
        if line.startswith("upstream step"):
            _say(line)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"upstream training failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads((work / "upstream-result.json").read_text())
    return result


def evaluate(
    drafts: dict[str, Path], verifier: Path, prompts: list[list[int]], k: int, max_new: int
) -> dict[str, Any]:
    """τ and per-position acceptance of each draft, all in one vLLM worker when possible."""
    from speculators_core.evaluate.vllm_runner import VllmError, VllmJob, run_vllm_jobs
    from speculators_core.plugins.host import get_host

    jobs = [
        VllmJob(
            verifier,
            path,
            prompts,
            k=k,
            max_new_tokens=max_new,
            temperature=0.0,
            seed=0,
            host=get_host(),  # the algorithm's record says how vLLM serves each draft
        )
        for path in drafts.values()
    ]
    try:
        results = run_vllm_jobs(jobs)
        return dict(zip(drafts, results, strict=True))
    except VllmError as err:
        _say(f"vLLM failed with both drafts in one worker ({err}); trying each on its own")
    out: dict[str, Any] = {}
    for (side, _path), job in zip(drafts.items(), jobs, strict=True):
        try:
            out[side] = run_vllm_jobs([job])[0]
        except VllmError as err:
            out[side] = str(err)
    return out


def _held_out_prompts(verifier: Path, source: str, num: int, max_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts

    tokenizer = AutoTokenizer.from_pretrained(verifier)
    return render_prompts(load_prompt_texts(source, num), tokenizer, max_prompt_tokens=max_tokens)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a quickstart output folder")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="upstream's training budget (default: our run's train_seconds)",
    )
    parser.add_argument(
        "--upstream-venv",
        default=os.environ.get("SPECULATORS_UPSTREAM_VENV", str(DEFAULT_UPSTREAM_VENV)),
    )
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--work", default=None, help="scratch folder (kept; default: a temp one)")
    opts = parser.parse_args()

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    run = Path(opts.run).absolute()
    if not (run / "quickstart.json").is_file():
        raise SystemExit(f"{run} holds no quickstart.json; pass a quickstart output folder")
    upstream_python = Path(opts.upstream_venv) / "bin" / "python"
    if not upstream_python.exists():
        raise SystemExit(
            f"upstream venv not found at {upstream_python.parent.parent}; make it with "
            "plugins/eagle3/tests/upstream/setup_upstream_venv.sh"
        )
    stages = json.loads((run / "quickstart.json").read_text()).get("stages", {})
    ours_dir = run / "speculator"
    has_ours = (ours_dir / "config.json").is_file()
    ours_seconds = our_train_seconds(run, stages) if has_ours else None
    budget = opts.train_seconds if opts.train_seconds is not None else ours_seconds
    if budget is None:
        raise SystemExit(
            f"{run} holds no trained draft to take the time from; pass --train-seconds"
        )
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="bench-tau-"))
    work.mkdir(parents=True, exist_ok=True)

    _say(f"rebuilding our run's initial draft and row plan from {run}")
    info = prepare(run, work, budget)
    settings, verifier = info["settings"], info["verifier"]
    _say(f"training upstream 0.9.0's draft for {budget:.0f} s on the same rows")
    upstream = train_upstream(upstream_python, work)
    upstream_dir = work / "upstream-draft"

    from speculators_core.check import check_checkpoint
    from speculators_core.plugins.host import get_host

    report = check_checkpoint(upstream_dir, host=get_host(), verifier=verifier)
    findings = [str(f) for f in report.findings]

    _say(f"vLLM: {opts.num_prompts} held-out prompts, k={settings.k}, greedy, both drafts")
    prompts = _held_out_prompts(
        verifier, settings.eval_prompt_source, opts.num_prompts, settings.seq_length
    )
    drafts = {"ours": ours_dir} if has_ours else {}
    drafts["upstream 0.9.0"] = upstream_dir
    evaluated = evaluate(drafts, verifier, prompts, settings.k, opts.max_new_tokens)

    train_stage = stages.get("train", {})
    sides: dict[str, dict[str, Any]] = {}
    if has_ours:
        sides["ours"] = {
            "train_seconds": ours_seconds,
            "steps": train_stage.get("steps"),
            "tokens": train_stage.get("tokens_seen"),
            "first_loss": info["our_first_loss"],
        }
    sides["upstream 0.9.0"] = {
        "train_seconds": upstream["train_seconds"],
        "steps": upstream["steps"],
        "tokens": upstream["tokens"],
        "first_loss": upstream["first_loss"],
        "planned_steps": upstream["planned_steps"],
        "calibrated_seconds_per_step": upstream["calibrated_seconds_per_step"],
        "check_findings": findings,
    }
    for side, result in evaluated.items():
        if isinstance(result, str):
            sides[side]["vllm_error"] = result
        else:
            sides[side]["tau"] = result.mean_acceptance_length
            sides[side]["per_position_acceptance"] = result.per_position_acceptance
            sides[side]["num_drafts"] = result.num_drafts

    # ---- the report
    print()
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs while this ran")
    print(
        f"EAGLE-3 drafts for {verifier.name} from {run}: 1 layer, draft vocab "
        f"{settings.draft_vocab_size}, TTT {settings.algo_options.get('ttt_steps', 3)}, rows of {settings.train_seq_len} "
        f"tokens ({info['train_samples']} training samples, {info['rows_per_epoch']} rows per "
        f"epoch), AdamW lr {settings.learning_rate:g}, float32, same initial weights"
    )
    stage_s = stages.get("train", {}).get("seconds")
    print(
        f"budget: {budget:.0f} s of training steps ("
        + ("--train-seconds" if opts.train_seconds is not None else "our run's train_seconds")
        + (
            f"; our train stage took {stage_s:.0f} s with set-up, validation and saving"
            if stage_s
            else ""
        )
        + f"); upstream used {upstream['train_seconds']:.0f} s"
    )
    print(
        f"schedules: ours {info['lr_scheduler']} to {info['min_lr_ratio']:g}x; upstream cosine to "
        f"0 over {upstream['planned_steps']} planned steps (calibrated "
        f"{upstream['calibrated_seconds_per_step']:.2f} s/step), ended at lr "
        f"{upstream['final_lr']:.3g}"
    )
    print(
        "upstream's Trainer cannot run on a CPU (it moves the model to cuda:0 and autocasts on "
        "'cuda'): its model step (shift_batch rows, forward, backward, clip, AdamW, scheduler) "
        "was driven by benchmarks/upstream_eagle3_train.py"
    )
    print(
        f"check (same configuration): first-row loss of the initial drafts: ours "
        f"{info['our_first_loss']:.4f}, upstream {upstream['first_loss']:.4f}; trainable "
        f"parameters: ours {info['our_trainable_parameters']:,}, upstream "
        f"{upstream['trainable_parameters']:,}"
    )
    print(
        "upstream draft, speculators check: "
        + ("no findings" if not findings else f"{len(findings)} finding(s)")
    )
    for line in findings:
        print(f"  {line}")
    print(
        f"vLLM τ on {len(prompts)} held-out prompts, k={settings.k}, "
        f"greedy, {opts.max_new_tokens} new tokens"
    )
    print(f"{'side':<16}{'train s':>9}{'steps':>7}{'tokens':>9}{'τ':>8}  per-position acceptance")
    for side, s in sides.items():
        tau = f"{s['tau']:.3f}" if "tau" in s else "-"
        per = ", ".join(f"{a:.3f}" for a in s.get("per_position_acceptance", [])) or s.get(
            "vllm_error", "-"
        )
        seconds = f"{s['train_seconds']:.0f}" if s["train_seconds"] is not None else "-"
        print(f"{side:<16}{seconds:>9}{s['steps'] or '-':>7}{s['tokens'] or '-':>9}{tau:>8}  {per}")
    ratio = None
    if "tau" in sides.get("ours", {}) and "tau" in sides["upstream 0.9.0"]:
        ratio = sides["ours"]["tau"] / sides["upstream 0.9.0"]["tau"]
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(f"ratio τ ours / upstream: {ratio:.3f}x (goal >= {GOAL}x: {verdict})")

    if opts.json:
        figures = {
            "run": str(run),
            "train_seconds_budget": budget,
            "num_prompts": len(prompts),
            "max_new_tokens": opts.max_new_tokens,
            "k": settings.k,
            "sides": sides,
            "ratio": ratio,
            "goal": GOAL,
            "work": str(work),
        }
        Path(opts.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
