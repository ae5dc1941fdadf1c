"""Regenerated training data: one pass (decode + record) against two passes (vLLM, then capture).

Both routes make the same thing from the same ShareGPT conversations for SmolLM2 (the embedded
default): the first user turn answered again by the verifier, greedy, at most
``--max-new-tokens`` tokens, and the EAGLE-3 hidden states (layers 2, 15, 27, 30) of every
token in a bf16 store.

* **two-pass**: ``regenerate_data`` with vLLM (engine start included), then
  ``capture_to_store`` with transformers (float32), as ``--generation-backend vllm`` does;
* **one-pass**: ``regenerate_to_store`` (transformers decoding that records the states of each
  token as it is written), the quickstart's default.

The routes run one after the other in one process tree, alternating over ``--rounds``; the
best round of each is kept. Printed: seconds, tokens, tokens/s of each route and the ratio
one-pass / two-pass. Answers may differ in rare near-ties (two greedy engines); token counts are
printed so the comparison can be checked.

    .venv/bin/python benchmarks/bench_data_routes.py [--samples 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def _two_pass(verifier: Path, work: Path, args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    import torch

    from speculators_core.data.regenerate import GenerationSettings, regenerate_data
    from speculators_core.data.store import capture_to_store

    started = time.perf_counter()
    data = regenerate_data(
        verifier=verifier,
        sources=["sharegpt"],
        output=work / "prepared",
        settings=GenerationSettings(max_new_tokens=args.max_new_tokens),
        seq_length=args.seq_length,
        max_samples=args.samples,
        seed=0,
        backend="vllm",
        overwrite=True,
        max_turns=1,
    )
    regenerated = time.perf_counter() - started
    store = capture_to_store(
        verifier=verifier,
        prepared=work / "prepared",
        output=work / "store",
        spec=spec,
        batch_size=8,
        max_batch_tokens=4096,
        compute_dtype=torch.float32,
        overwrite=True,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "regenerate_seconds": regenerated,
        "tokens": store.num_tokens,
        "answer_tokens": data.num_supervised_tokens,
    }


def _one_pass(verifier: Path, work: Path, args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    from speculators_core.data.decode_capture import regenerate_to_store

    started = time.perf_counter()
    data, store = regenerate_to_store(
        verifier=verifier,
        sources=["sharegpt"],
        prepared_output=work / "prepared",
        store_output=work / "store",
        spec=spec,
        max_new_tokens=args.max_new_tokens,
        seq_length=args.seq_length,
        max_samples=args.samples,
        seed=0,
        batch_size=args.batch_size,
        overwrite=True,
    )
    return {
        "seconds": time.perf_counter() - started,
        "tokens": store.num_tokens,
        "answer_tokens": data.num_supervised_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="one-pass batch")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from speculators_core.assets import smollm2_path
    from speculators_core.data.specs import spec_for_algorithm

    verifier = smollm2_path()
    spec = spec_for_algorithm("eagle3", verifier)
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-routes-") as tmp:
        for round_ in range(args.rounds):
            for name, route in (("two-pass", _two_pass), ("one-pass", _one_pass)):
                work = Path(tmp) / name
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                result = route(verifier, work, args, spec)
                print(
                    f"round {round_ + 1} {name}: {result['seconds']:.1f} s, "
                    f"{result['tokens']:,} tokens ({result['answer_tokens']:,} answer), "
                    f"{result['tokens'] / result['seconds']:.0f} tokens/s",
                    flush=True,
                )
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
    one, two = best["one-pass"], best["two-pass"]
    print("\n| route | seconds | tokens | tokens/s |\n|---|---|---|---|")
    for name in ("two-pass", "one-pass"):
        r = best[name]
        print(
            f"| {name} | {r['seconds']:.1f} | {r['tokens']:,} | {r['tokens'] / r['seconds']:.0f} |"
        )
    rate = (one["tokens"] / one["seconds"]) / (two["tokens"] / two["seconds"])
    print(f"\none-pass / two-pass tokens/s: {rate:.2f}x")


if __name__ == "__main__":
    main()
