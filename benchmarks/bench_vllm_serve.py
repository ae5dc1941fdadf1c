"""Benchmark: vLLM decode speed at batch size 1, the verifier alone vs with an EAGLE-3 draft.

Both engines run in one vLLM worker process, one after the other, on the same prompts (the
held-out ShareGPT prompts by default, chat template applied), each generating exactly
``--max-new-tokens`` tokens per prompt (EOS ignored) one prompt at a time after a warm-up
request. The script prints the tokens/s of each side and their ratio (the speed-up), vLLM's
mean acceptance length and per-position acceptance, and whether the greedy outputs are
identical. With ``--rounds R`` the pair is measured R times in the same worker and each side
counts with its best round (other processes on a shared machine only ever slow a round down).

The draft is ``--draft DIR`` (a trained speculator folder), or with ``--fit-draft`` an EAGLE-3
draft fitted in the script to the verifier's own greedy answers to the benchmark prompts: an
optimistic draft (it has seen the answers) that shows what acceptance buys on this machine,
not what a real draft achieves. On a CPU the ASSETS.md settings are applied (float32, thread
binding, preloaded Intel OpenMP, eager mode).

    .venv/bin/python benchmarks/bench_vllm_decode.py (--draft DIR | --fit-draft)
        [--verifier DIR] [--prompts sharegpt-heldout|FILE] [--num-prompts 4]
        [--max-new-tokens 128] [--k 3] [--rounds 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def _fit_draft(
    verifier: Path, prompts: list[list[int]], k: int, max_new_tokens: int, out: Path
) -> None:
    """An EAGLE-3 draft fitted to vLLM's greedy answers (batched, untimed) to ``prompts``."""
    import torch
    from transformers import AutoModelForCausalLM

    from speculators_core.evaluate.vllm_drafts import fit_draft
    from speculators_core.evaluate.vllm_runner import run_vllm
    from speculators_core.plugins.host import get_host

    print(f"fitting a draft: generating {len(prompts)} answers with vLLM ...", file=sys.stderr)
    answers = run_vllm(
        verifier, None, prompts, k=k, max_new_tokens=max_new_tokens, ignore_eos=True, warmup=False
    ).outputs
    sequences = [p + a for p, a in zip(prompts, answers)]
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    layers = int(model.config.num_hidden_layers)
    eagle3 = get_host().algorithm("eagle3").model_class
    torch.manual_seed(0)
    draft = eagle3.from_verifier(
        verifier,
        aux_layer_ids=[2, layers // 2, layers - 3],
        draft_vocab_size=min(8192, int(model.config.vocab_size)),
        token_counts=dict(Counter(t for s in sequences for t in s)),
        ttt_steps=k,
        noise_std=0.0,
        speculative_tokens=k,
    )
    history = fit_draft(
        draft, model, sequences, [len(p) for p in prompts], steps=40, lr=1e-3, progress=True
    )
    last = history[-1]
    accs = " ".join(f"{last[f'full_acc_{i}']:.2f}" for i in range(k) if f"full_acc_{i}" in last)
    print(f"fitted: training accuracy per position {accs}", file=sys.stderr)
    draft.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--draft", type=Path, help="a trained speculator folder")
    source.add_argument(
        "--fit-draft", action="store_true", help="fit an EAGLE-3 draft to the prompts' answers"
    )
    parser.add_argument("--verifier", type=Path, default=None, help="default: SmolLM2 (ASSETS.md)")
    parser.add_argument("--prompts", default="sharegpt-heldout")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from speculators_core.assets import smollm2_path
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.evaluate.vllm_env import detect_device
    from speculators_core.evaluate.vllm_runner import VllmJob, run_vllm_jobs
    from speculators_core.plugins.host import get_host

    verifier = args.verifier or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = render_prompts(
        load_prompt_texts(args.prompts, args.num_prompts),
        tokenizer,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        draft = args.draft
        if args.fit_draft:
            draft = Path(tmp) / "draft"
            _fit_draft(verifier, prompts, args.k, args.max_new_tokens, draft)
        common: dict[str, Any] = {
            "verifier": verifier,
            "prompts": prompts,
            "k": args.k,
            "max_new_tokens": args.max_new_tokens,
            "ignore_eos": True,
            "batch_size": 1,
            "host": get_host(),  # the algorithm's record says how vLLM serves the draft
        }
        jobs = [VllmJob(draft=d, **common) for _ in range(args.rounds) for d in (None, draft)]
        print(
            f"measuring: {len(prompts)} prompts x {args.max_new_tokens} tokens at batch size 1, "
            f"{args.rounds} round(s), device {detect_device()} ...",
            file=sys.stderr,
        )
        results = run_vllm_jobs(jobs)
    alone = max(results[0::2], key=lambda r: r.tokens_per_second)
    spec = max(results[1::2], key=lambda r: r.tokens_per_second)
    ratio = spec.tokens_per_second / alone.tokens_per_second
    per_pos = " / ".join(f"{a:.3f}" for a in spec.per_position_acceptance)
    draft_name = (
        "fitted to these prompts' answers (optimistic)" if args.fit_draft else str(args.draft)
    )
    print(f"verifier:                {verifier}")
    print(f"draft:                   {draft_name}")
    print(
        f"prompts:                 {len(prompts)} x {args.max_new_tokens} new tokens, k = {args.k}"
    )
    print(f"verifier alone:          {alone.tokens_per_second:7.2f} tok/s (batch 1)")
    print(f"with the draft:          {spec.tokens_per_second:7.2f} tok/s (batch 1)")
    print(f"speed-up:                {ratio:7.2f}x")
    print(f"mean acceptance length:  {spec.mean_acceptance_length:7.3f}")
    print(f"per-position acceptance: {per_pos}")
    print(f"identical greedy output: {spec.outputs == alone.outputs}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "verifier": str(verifier),
                    "draft": draft_name,
                    "speedup": ratio,
                    "alone": alone.to_json() | {"outputs": None},
                    "speculative": spec.to_json() | {"outputs": None},
                    "identical_outputs": spec.outputs == alone.outputs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
