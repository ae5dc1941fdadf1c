"""Benchmark: the proposal methods side by side on one draft, greedy and sampling.

The quickstart's draft (``--draft``, e.g. ``quickstart-output/speculator``) on held-out ShareGPT
prompts (first user turns, chat template applied): for every installed proposal method
(``greedy`` from the core; ``sampled`` and ``block`` from speculators-proposals), τ, acceptance
per position and tokens/s, at temperature 0 and at each ``--temperatures`` value, in the
reference decoder (transformers verifier, one prompt at a time, seeded) and in vLLM where it
serves the method (vLLM for CPU: ``greedy``, ``sampled``; ``block`` only on vLLM's V2 runner).
At temperature 0 every chain method drafts the argmax chain and keeps the same tokens, so one
row stands for them (the tree differs: it verifies 16 nodes per round). Everything runs in one sitting, one engine at a time.

    .venv/bin/python benchmarks/bench_proposals.py --draft quickstart-output/speculator \
        [--num-prompts 8] [--max-new-tokens 96] [--temperatures 1] [--methods greedy,sampled,block]
        [--no-vllm | --no-reference] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", type=Path, required=True, help="a speculators draft folder")
    parser.add_argument("--verifier", type=Path, default=None, help="default: the draft's own")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--temperatures", default="1", help="sampling temperatures besides 0")
    parser.add_argument("--methods", default=None, help="default: every installed method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument(
        "--no-reference", action="store_true", help="only the vLLM rows (e.g. to add them later)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from speculators_core.cli.eval_cmd import resolve_verifier
    from speculators_core.evaluate.evaluation import evaluate_reference, evaluate_vllm
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.evaluate.vllm_env import detect_device, vllm_available
    from speculators_core.evaluate.vllm_runner import VllmError, proposal_config
    from speculators_core.plugins.host import get_host

    host = get_host()
    installed = host.proposal_methods()
    names = args.methods.split(",") if args.methods else sorted(installed)
    methods = [host.proposal_method(name) for name in names]
    temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    verifier = resolve_verifier(args.draft, str(args.verifier) if args.verifier else None)
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = render_prompts(
        load_prompt_texts("sharegpt-heldout", args.num_prompts), tokenizer, max_prompt_tokens=1024
    )
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    use_vllm = not args.no_vllm and vllm_available()
    device = detect_device(None)

    # (temperature, method) settings: at temperature 0 every chain method drafts and keeps the
    # same tokens, so one row stands for them; a method with its own round (the tree) differs.
    chain = sorted((m for m in methods if m.round is None), key=lambda m: m.name != "greedy")
    own_round = [m for m in methods if m.round is not None]
    settings = [(0.0, m) for m in [*chain[:1], *own_round]]
    settings += [(t, m) for t in temperatures for m in methods]
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    started = time.time()
    for temperature, method in settings:
        common = dict(
            k=args.k,
            temperature=temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            baseline=False,
            host=host,
            proposal=method,
        )
        if not args.no_reference:
            loads.append(os.getloadavg()[0])
            print(f"reference decoder: {method.name} at T={temperature:g} ...", file=sys.stderr)
            result = evaluate_reference(args.draft, verifier, prompts, eos=eos, **common)
            rows.append({"method": method.name, "temperature": temperature, **result})
        if not use_vllm:
            continue
        try:
            proposal_config(method, device)
        except VllmError as err:
            rows.append(
                {
                    "method": method.name,
                    "temperature": temperature,
                    "engine": "vllm",
                    "refused": str(err),
                }
            )
            continue
        loads.append(os.getloadavg()[0])
        print(f"vLLM: {method.name} at T={temperature:g} ...", file=sys.stderr)
        result = evaluate_vllm(args.draft, verifier, prompts, **common)
        rows.append({"method": method.name, "temperature": temperature, **result})
    minutes = (time.time() - started) / 60

    print(
        f"\n{args.draft}: {len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, "
        f"k = {args.k}, seed {args.seed}; {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {min(loads):.1f}-{max(loads):.1f}; {minutes:.1f} min\n"
    )
    print("| method | T | engine | τ | per position | tokens/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        chain_row = row["temperature"] == 0 and row["method"] in {m.name for m in chain}
        label = "every chain method" if chain_row else row["method"]
        if "refused" in row:
            print(f"| {label} | {row['temperature']:g} | vllm | not served: {row['refused']} | | |")
            continue
        rates = " / ".join(f"{r:.2f}" for r in row["acceptance_rate_per_position"])
        print(
            f"| {label} | {row['temperature']:g} | {row['engine']} | "
            f"{row['mean_acceptance_length']:.3f} | {rates} | {row['tokens_per_second']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "loads": loads}, indent=2) + "\n")


if __name__ == "__main__":
    main()
