"""Benchmark: a HASS draft and an EAGLE-3 draft for SmolLM2, same data, same budget, τ side by side.

1. **Data, once.** ``--samples`` usable conversations of ShareGPT's training split (seeded order) are
   rendered with SmolLM2's chat template and loss masks (``prepare_data``, truncated to
   ``--seq-length`` tokens), and SmolLM2's states are captured once into a float32 shard store
   with the spec ``(2, 15, 27, 30)`` (``capture_to_store``). EAGLE-3 trains on all four states
   (three aux states and the final pre-norm state for its targets). HASS trains on the final
   *post-norm* state, obtained from the same store by applying SmolLM2's final norm to state 30:
   exactly what capturing with HASS's own spec ``((30,), post_norm_last=True)`` gives.
2. **Training, same budget.** Each draft is trained by the core ``Trainer`` on the same packed
   rows (same seed, ``--seq-len``, one row per step), either for ``--max-steps`` optimizer steps
   (the default) or for ``--seconds`` of wall-clock training each (a callback stops the run), with
   its own algorithm's defaults: HASS 3 steps of harmonized context alignment with the published
   loss weights and full-vocabulary LM head; EAGLE-3 3 TTT steps with a draft vocabulary of
   ``--eagle3-vocab`` tokens (the most frequent supervised tokens of the same data). Both use
   AdamW with learning rate ``--lr``, betas (0.9, 0.95), 1 % warm-up and linear decay.
3. **τ.** The reference decoder (greedy, ``k = 3``) generates ``--new-tokens`` tokens for each of
   ``--prompts`` held-out ShareGPT prompts (records from 15,000 on, never trained on) with each
   draft; τ is the mean acceptance length (tokens per verifier forward while drafting).

4. **Served speed** (``--served``, needs vLLM): the measurement of ``speculators eval --engine
   vllm-server``: ``vllm serve`` for SmolLM2 alone, with the EAGLE-3 draft (its folder) and
   with the HASS draft (exported to vLLM's native EAGLE-1 layout, ``method: "eagle"``), one
   server at a time, the same held-out prompts streamed over HTTP one request at a time (and at
   each ``--concurrency`` level); per-request median output tokens/s, the speed-up against the
   verifier alone, τ from each server's ``/metrics`` and whether the output equals the
   verifier's token for token.

Prints one table: steps, tokens seen, training wall time, final training accuracy, τ and the
per-position acceptance of both drafts (and with ``--served`` the served rows). ``--work DIR`` keeps the prepared data and the store for
a rerun (the capture is the slow part).

    .venv/bin/python plugins/hass/benchmarks/bench_hass_vs_eagle3.py [--samples 48]
        [--seq-length 256] [--max-steps 40 | --seconds 300] [--prompts 8] [--new-tokens 64]
        [--served [--concurrency 1,4]]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

EAGLE3_LAYER_IDS = (2, 15, 27, 30)
K = 3


class FinalPostNormView:
    """A sample source over an EAGLE-3 store giving HASS's feature: ``norm(state 30)``, ``[L, 1, H]``."""

    def __init__(self, store: Any, norm: torch.nn.Module) -> None:
        self.store = store
        self.norm = norm

    def __len__(self) -> int:
        return len(self.store)

    def num_tokens(self, index: int) -> int:
        return int(self.store.num_tokens(index))

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        sample = dict(self.store[index])
        with torch.no_grad():
            sample["hidden_states"] = self.norm(sample["hidden_states"][:, -1:].float())
        return sample


def time_budget_callback(seconds: float) -> Any:
    """A trainer callback that stops training once ``seconds`` of steps have run."""
    from speculators_core.train import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.perf_counter() - self.started >= seconds:
                control.should_training_stop = True

    return TimeBudget()


def prepare(work: Path, samples: int, seq_length: int) -> tuple[Path, Path]:
    """Prepared ShareGPT data and its float32 EAGLE-3 store in ``work`` (reused when present)."""
    from speculators_core import HiddenStateSpec
    from speculators_core.assets import smollm2_path
    from speculators_core.data import capture_to_store, prepare_data

    verifier = smollm2_path()
    prepared, store = work / "prepared", work / "store"
    if not prepared.is_dir():
        prepare_data(
            verifier=verifier,
            sources=["sharegpt"],
            output=prepared,
            seq_length=seq_length,
            max_samples=samples,
        )
    if not (store / "manifest.json").is_file():
        started = time.perf_counter()
        summary = capture_to_store(
            verifier=verifier,
            prepared=prepared,
            output=store,
            spec=HiddenStateSpec(EAGLE3_LAYER_IDS),
            dtype=torch.float32,
            progress=True,
        )
        print(
            f"captured {summary.num_tokens:,} tokens in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return prepared, store


def train(
    name: str, model: Any, source: Any, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """Train ``model`` under the budget; return steps, tokens, seconds and the last metrics."""
    from speculators_core.train import Trainer, TrainingArguments

    training = TrainingArguments(
        output_dir=str(out),
        num_epochs=1000,  # the budget ends the run
        max_steps=args.max_steps if args.seconds is None else None,
        seq_len=args.seq_len,
        micro_batch_rows=1,
        learning_rate=args.lr,
        optimizer_kwargs={"betas": [0.9, 0.95]},
        val_fraction=0.0,
        save_per_epoch=False,
        metric_for_best=None,
        log_every=5,
        progress=False,
        console_log=False,
        tensorboard=False,
        seed=0,
    )
    callbacks = [time_budget_callback(args.seconds)] if args.seconds is not None else []
    torch.manual_seed(0)
    started = time.perf_counter()
    result = Trainer(model, training, source, callbacks=callbacks).train()
    seconds = time.perf_counter() - started
    print(f"{name}: {result.state.global_step} steps in {seconds:.0f} s", flush=True)
    return {
        "steps": result.state.global_step,
        "tokens": result.state.tokens_seen,
        "seconds": seconds,
        "metrics": result.metrics,
        "final_dir": result.final_dir,
    }


def evaluate(draft: Any, verifier_model: Any, prompts: list[list[int]], args: Any, eos: int) -> Any:
    """Greedy reference decoding of every prompt with ``draft``; the summed stats."""
    from speculators_core.evaluate import DecodeStats, ReferenceDecoder

    decoder = ReferenceDecoder(verifier_model, draft.eval(), k=K, eos_token_ids=[eos])
    total = DecodeStats(k=K)
    for prompt in prompts:
        total.merge(decoder.generate(prompt, max_new_tokens=args.new_tokens).stats)
    return total


def measure_served(
    verifier: Path,
    drafts: dict[str, tuple[str, Path]],
    prompts: list[list[int]],
    *,
    new_tokens: int,
    concurrency: list[int],
    log_dir: Path,
) -> dict[str, Any]:
    """The verifier alone and each draft through ``vllm serve``, one server at a time.

    ``drafts`` maps a name to (vLLM method, folder vLLM reads). The servers are the command
    ``speculators serve`` builds for the EAGLE-3 draft with its ``--speculative-config``
    replaced, so every server has the same settings; the measurement is ``measure_server``,
    the one ``eval --engine vllm-server`` uses.
    """
    from speculators_core.cli.serve import build_serve_command
    from speculators_core.evaluate.vllm_server import measure_server, verifier_argv
    from speculators_core.plugins.host import get_host

    base = build_serve_command(
        drafts["eagle3"][1], plugin_host=get_host(), verifier=str(verifier), k=K
    )
    plain = verifier_argv(base.argv)
    model = plain[plain.index("serve") + 1]
    common: dict[str, Any] = {
        "max_tokens": new_tokens,
        "concurrencies": concurrency,
        "log_dir": log_dir,
        "echo": lambda line: print(line, flush=True),
    }
    alone = measure_server("verifier", plain, base.env, model, prompts, **common)
    served: dict[str, Any] = {"verifier": alone.to_json()}
    for name, (method, folder) in drafts.items():
        config = {"method": method, "model": str(folder), "num_speculative_tokens": K}
        argv = [*plain, "--speculative-config", json.dumps(config)]
        measured = measure_server(name, argv, base.env, model, prompts, **common)
        served[name] = {
            **measured.to_json(),
            "identical_to_verifier": measured.outputs == alone.outputs,
            "speedup": {
                str(c): measured.levels[c].tokens_per_s_median / alone.levels[c].tokens_per_s_median
                for c in measured.levels
            },
        }
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48, help="ShareGPT training conversations.")
    parser.add_argument("--seq-length", type=int, default=256, help="Truncation of each sample.")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="Packed row length (one row per step)."
    )
    parser.add_argument("--max-steps", type=int, default=40, help="Optimizer steps per draft.")
    parser.add_argument(
        "--seconds", type=float, default=None, help="Wall-clock budget per draft instead of steps."
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eagle3-vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=8, help="Held-out ShareGPT prompts for τ.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="Keep data and store here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures as JSON.")
    parser.add_argument(
        "--served", action="store_true", help="Also measure both drafts through vllm serve."
    )
    parser.add_argument(
        "--concurrency", default="1", help="With --served: requests in flight, e.g. 1,4."
    )
    args = parser.parse_args()

    from collections import Counter

    from speculators_eagle3 import Eagle3DraftModel
    from speculators_hass import EagleDraftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators_core.assets import smollm2_path
    from speculators_core.data import ShardStore
    from speculators_core.evaluate.prompts import BUILTIN_PROMPTS, load_prompt_texts, render_prompts

    verifier = smollm2_path()
    with tempfile.TemporaryDirectory(prefix="bench-hass-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        _prepared, store_dir = prepare(work, args.samples, args.seq_length)
        store = ShardStore.open(store_dir)
        verifier_model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
        hass_source = FinalPostNormView(store, verifier_model.model.norm)
        counts: Counter[int] = Counter()
        for i in range(len(store)):
            sample = store[i]
            counts.update(sample["input_ids"][sample["loss_mask"].bool()].tolist())

        torch.manual_seed(0)
        hass = EagleDraftModel.from_verifier(verifier)
        torch.manual_seed(0)
        eagle3 = Eagle3DraftModel.from_verifier(
            verifier,
            aux_layer_ids=list(EAGLE3_LAYER_IDS[:-1]),
            draft_vocab_size=args.eagle3_vocab,
            token_counts=dict(counts),
        )
        results = {
            "hass": train("hass", hass, hass_source, args, work / "hass"),
            "eagle3": train("eagle3", eagle3, store, args, work / "eagle3"),
        }

        tokenizer = AutoTokenizer.from_pretrained(verifier)
        texts = load_prompt_texts(BUILTIN_PROMPTS, args.prompts)
        prompts = render_prompts(texts, tokenizer, max_prompt_tokens=256)
        for name, model in (("hass", hass), ("eagle3", eagle3)):
            stats = evaluate(model, verifier_model, prompts, args, tokenizer.eos_token_id)
            results[name]["stats"] = stats
            print(f"{name}: τ {stats.mean_acceptance_length:.3f}", flush=True)
        served = None
        if args.served:
            from speculators_hass.export import export_vllm_eagle

            from speculators_core.options import positive_ints

            exported = export_vllm_eagle(hass, work / "hass-vllm")
            eagle3.save_pretrained(work / "eagle3-draft")
            served = measure_served(
                verifier,
                {"hass": ("eagle", exported), "eagle3": ("eagle3", work / "eagle3-draft")},
                prompts,
                new_tokens=args.new_tokens,
                concurrency=positive_ints(args.concurrency, "--concurrency"),
                log_dir=work,
            )
            for name in ("hass", "eagle3"):
                results[name]["served"] = served[name]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    budget = (
        f"{args.seconds:.0f} s each" if args.seconds is not None else f"{args.max_steps} steps each"
    )
    print()
    print(
        f"SmolLM2-135M-Instruct, {len(store)} ShareGPT samples ({store.manifest.num_tokens:,} tokens), "
        f"budget {budget}, lr {args.lr}, k = {K}, {len(prompts)} held-out prompts x "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, load average {load:.1f}"
    )
    rows = [
        ("optimizer steps", lambda r: f"{r['steps']}"),
        ("tokens seen", lambda r: f"{r['tokens']:,}"),
        ("training wall time (s)", lambda r: f"{r['seconds']:.0f}"),
        ("training tokens/s", lambda r: f"{r['tokens'] / r['seconds']:.0f}"),
        ("last logged step-0 accuracy", lambda r: _acc0(r["metrics"])),
        ("τ (mean acceptance length)", lambda r: f"{r['stats'].mean_acceptance_length:.3f}"),
        (
            "acceptance per position",
            lambda r: " / ".join(f"{a:.3f}" for a in r["stats"].acceptance_rate_per_position),
        ),
        ("decode rounds", lambda r: f"{r['stats'].rounds}"),
    ]
    if served is not None:
        alone_rate = served["verifier"]["levels"]["1"]["tokens_per_s_median"]
        rows += [
            (
                "served tok/s, 1 in flight",
                lambda r: (
                    f"{r['served']['levels']['1']['tokens_per_s_median']:.1f} "
                    f"(alone {alone_rate:.1f})"
                ),
            ),
            ("served speed-up, 1 in flight", lambda r: f"{r['served']['speedup']['1']:.2f}x"),
            ("served τ (vLLM /metrics)", lambda r: f"{r['served']['mean_acceptance_length']:.3f}"),
            ("served output = verifier's", lambda r: str(r["served"]["identical_to_verifier"])),
        ]
    print(f"{'':32} {'HASS (eagle)':>22} {'EAGLE-3':>22}")
    for label, show in rows:
        print(f"{label:32} {show(results['hass']):>22} {show(results['eagle3']):>22}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    name: {
                        "steps": r["steps"],
                        "tokens": r["tokens"],
                        "seconds": r["seconds"],
                        "metrics": r["metrics"],
                        "decode": r["stats"].to_json(),
                        "served": r.get("served"),
                    }
                    for name, r in results.items()
                },
                indent=2,
            )
        )


def _acc0(metrics: dict[str, float]) -> str:
    """Step-0 accuracy of the last log: HASS's ``cond_acc_0``, EAGLE-3's ``full_acc_0``."""
    for key in ("cond_acc_0", "full_acc_0"):
        if key in metrics:
            return f"{metrics[key]:.3f}"
    return "n/a"


if __name__ == "__main__":
    main()
