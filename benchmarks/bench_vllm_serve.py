"""Benchmark: decode speed as users feel it, through ``vllm serve``: the verifier alone, a draft at
each k, and vLLM's n-gram prompt lookup, one server at a time.

The measurement is ``speculators eval --engine vllm-server``'s (``compare_served``): each
configuration gets its own ``vllm serve`` (the command ``speculators serve`` builds, ASSETS.md's
CPU settings on a CPU) on 127.0.0.1, one warm-up request, then the same greedy prompts (held-out
ShareGPT first user turns, chat template applied, exactly ``--max-new-tokens`` tokens each, EOS
ignored) streamed over HTTP at concurrency 1 and at each ``--concurrency`` level. The table gives
per-request median output tokens/s, TTFT and ITL, the speed-up against the verifier alone and
against n-gram lookup, and τ from the server's ``/metrics`` counters; outputs are compared token
for token with the verifier's. The fastest k at concurrency 1 is named.

The draft is ``--draft DIR`` (a trained speculator folder), or with ``--fit-draft`` an EAGLE-3
draft fitted in the script to the verifier's own greedy answers to the benchmark prompts: an
optimistic draft (it has seen the answers) that shows what acceptance buys on this machine,
not what a real draft achieves.

    .venv/bin/python benchmarks/bench_vllm_serve.py (--draft DIR | --fit-draft)
        [--verifier DIR] [--prompts sharegpt-heldout|FILE] [--num-prompts 8]
        [--max-new-tokens 128] [--k-values 1,2,3] [--concurrency 1,4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path


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
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k-values", default="1,2,3", help="the k measured, e.g. 1,2,3")
    parser.add_argument("--concurrency", default="1,4", help="requests in flight, e.g. 1,4,16")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from speculators_core.assets import smollm2_path
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.evaluate.tables import served_table
    from speculators_core.evaluate.vllm_env import detect_device
    from speculators_core.evaluate.vllm_server import compare_served
    from speculators_core.options import positive_ints
    from speculators_core.plugins.host import get_host

    ks = positive_ints(args.k_values, "--k-values")
    levels = positive_ints(args.concurrency, "--concurrency")
    verifier = args.verifier or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = render_prompts(
        load_prompt_texts(args.prompts, args.num_prompts),
        tokenizer,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="bench-vllm-serve-") as tmp:
        draft = args.draft
        if args.fit_draft:
            draft = Path(tmp) / "draft"
            _fit_draft(verifier, prompts, max(ks), args.max_new_tokens, draft)
        print(
            f"measuring: {len(prompts)} prompts x {args.max_new_tokens} tokens through vllm serve, "
            f"k {ks}, concurrency {levels}, device {detect_device()} ...",
            file=sys.stderr,
        )
        load_before = os.getloadavg()[0]
        report = compare_served(
            draft,
            prompts,
            plugin_host=get_host(),  # the algorithm's record says how vLLM serves the draft
            k_values=ks,
            concurrencies=levels,
            max_new_tokens=args.max_new_tokens,
            verifier=str(verifier),
            log_dir=Path(tmp),
            echo=lambda line: print(line, file=sys.stderr),
        )
        load_after = os.getloadavg()[0]
    draft_name = (
        "fitted to these prompts' answers (optimistic)" if args.fit_draft else str(args.draft)
    )
    print(f"verifier: {verifier}")
    print(f"draft:    {draft_name}")
    print(
        f"machine:  {platform.machine()}, {os.cpu_count()} CPUs, load average {load_before:.1f} "
        f"before / {load_after:.1f} after (the servers themselves load it)"
    )
    print(f"prompts:  {len(prompts)} x {args.max_new_tokens} new tokens, greedy")
    for line in served_table(report):
        print(line)
    if args.json is not None:
        report = {**report, "draft_name": draft_name, "load": [load_before, load_after]}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
