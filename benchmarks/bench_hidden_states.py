"""Hidden-state capture speed against a bare verifier forward, and bytes per token on disk.

Prepares ShareGPT training samples for SmolLM2 (the embedded default), then times, over the
same samples and the same batches:

* the bare verifier forward: ``AutoModelForCausalLM`` called on each padded batch (logits
  included; no states kept), and the decoder alone (no LM head);
* ``capture_to_store``: the whole hidden-state run (forward with hooks, dtype conversion,
  shard writing, manifest).

and prints tokens/s of each, the ratio capture / bare forward (goal >= 0.8), and the store's
bytes per token. Run: ``python benchmarks/bench_hidden_states.py [--samples 32]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layer-ids", default="2,15,27,30")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=2, help="Timed repetitions (best is kept).")
    args = parser.parse_args()

    from speculators_core.assets import smollm2_path
    from speculators_core.data.capture import plan_batches
    from speculators_core.data.prepared import PreparedDataset, prepare_data
    from speculators_core.data.store import capture_to_store
    from speculators_core.data.summary import folder_bytes
    from speculators_core.data.verifier import load_verifier_model
    from speculators_core.features import HiddenStateSpec

    verifier = smollm2_path()
    spec = HiddenStateSpec(tuple(int(i) for i in args.layer_ids.split(",")))
    shard_size = 256
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_data(
            verifier=verifier,
            sources=["sharegpt"],
            output=root / "prep",
            seq_length=args.seq_length,
            max_samples=args.samples,
        )
        data = PreparedDataset.open(root / "prep")
        tokens = data.manifest.num_tokens
        model = load_verifier_model(verifier)

        # The exact batches the capture run forms (per shard, by length).
        batches = []
        for lo in range(0, len(data), shard_size):
            idx = list(range(lo, min(lo + shard_size, len(data))))
            lengths = [data.num_tokens(i) for i in idx]
            for b in plan_batches(lengths, batch_size=args.batch_size):
                seqs = [data[idx[i]]["input_ids"] for i in b]
                longest = max(s.numel() for s in seqs)
                ids = torch.zeros(len(seqs), longest, dtype=torch.long)
                mask = torch.zeros(len(seqs), longest, dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : s.numel()] = s
                    mask[r, : s.numel()] = 1
                batches.append((ids, mask))

        def bare(module: torch.nn.Module) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for ids, mask in batches:
                    module(input_ids=ids, attention_mask=mask, use_cache=False)
            return time.perf_counter() - start

        def capture(out: Path) -> float:
            start = time.perf_counter()
            capture_to_store(
                verifier=verifier,
                prepared=data,
                output=out,
                spec=spec,
                dtype=args.dtype,
                batch_size=args.batch_size,
                shard_size=shard_size,
            )
            return time.perf_counter() - start

        with torch.no_grad():  # warm-up
            model(input_ids=batches[0][0], attention_mask=batches[0][1], use_cache=False)
        # Interleaved repetitions, best of each: on a shared machine the load drifts, and
        # measuring one kind after the other would charge the drift to one of them.
        t_full = t_decoder = t_capture = float("inf")
        store = root / "hs"
        for r in range(args.repeats):
            t_full = min(t_full, bare(model))
            t_decoder = min(t_decoder, bare(model.get_decoder()))
            store = root / f"hs{r}"
            t_capture = min(t_capture, capture(store))
        size = folder_bytes(store)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SmolLM2-135M-Instruct on {torch.get_num_threads()} threads (load average {load:.1f})")
    print(
        f"samples {args.samples}, tokens {tokens:,}, batch size {args.batch_size}, ids {spec.layer_ids}, {args.dtype}"
    )
    print(f"bare forward (causal LM, logits): {tokens / t_full:8.1f} tokens/s")
    print(f"bare forward (decoder only):      {tokens / t_decoder:8.1f} tokens/s")
    print(
        f"hidden-state capture run:         {tokens / t_capture:8.1f} tokens/s (incl. writing the store)"
    )
    print(f"ratio capture / bare causal-LM forward: {t_full / t_capture:.2f} (goal >= 0.8)")
    print(f"ratio capture / bare decoder forward:   {t_decoder / t_capture:.2f}")
    print(f"store: {size:,} bytes, {size / tokens:,.0f} bytes per token")


if __name__ == "__main__":
    main()
