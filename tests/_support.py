"""Helpers shared by the core's tests (importable as ``_support``; conftest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_cli(
    args: list[str],
    *,
    site: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m speculators_core ARGS`` in a subprocess with optional installed fixtures."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    full_env["PYTHONPATH"] = str(site) if site else ""
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "speculators_core", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def run_python(
    code: str, *, site: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a subprocess with optional installed fixtures."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    full_env["PYTHONPATH"] = str(site) if site else ""
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def chat_prompts(tokenizer: Any, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn with the chat template and generation prompt (token ids)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in questions
    ]


def greedy_continuations(
    verifier: Path, questions: list[str], new_tokens: int
) -> tuple[Any, Any, list[list[int]], list[list[int]]]:
    """The verifier (float32, eval), its tokenizer, each question as a chat prompt (token ids), and the
    verifier's own greedy continuation of each (exactly ``new_tokens`` tokens): the data a test
    draft is fitted to so that vLLM must accept its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(verifier)
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, questions)
    with torch.no_grad():
        greedy = [
            model.generate(
                torch.tensor([p]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0].tolist()[len(p) :]
            for p in prompts
        ]
    return model, tokenizer, prompts, greedy


def check_served_report(
    report: dict[str, Any], *, ks: list[int], levels: list[int], prompts: int, new_tokens: int
) -> int:
    """Re-derive every figure of a ``compare_served`` report from its raw counts and rates;
    return the chosen k (asserted to be the fastest measured at concurrency 1).

    Lossless outputs, tau and per-position acceptance from the server's own counters, every
    request complete, speed-ups the ratios of the measured per-request rates.
    """
    import pytest

    alone, ngram = report["verifier_alone"], report["ngram"]
    assert alone["drafts"] == 0 and alone["mean_acceptance_length"] is None
    assert report["concurrencies"] == sorted({1, *levels})
    assert ngram["identical_to_verifier"] is True and ngram["k"] == max(ks)
    rates = {}
    for k in ks:
        draft = report["draft"][str(k)]
        assert draft["identical_to_verifier"] is True, f"k={k}: not lossless through the server"
        assert draft["draft_tokens"] == pytest.approx(k * draft["drafts"])
        assert draft["mean_acceptance_length"] == pytest.approx(
            1 + draft["accepted_tokens"] / draft["drafts"]
        )
        assert len(draft["acceptance_per_position"]) == k
        assert sum(draft["acceptance_per_position"]) == pytest.approx(
            draft["accepted_tokens"] / draft["drafts"]
        )
        for c in report["concurrencies"]:
            level = draft["levels"][str(c)]
            assert level["requests"] == prompts
            assert level["output_tokens"] == prompts * new_tokens
            rate = level["tokens_per_s_median"]
            assert draft["speedup"][str(c)] == pytest.approx(
                rate / alone["levels"][str(c)]["tokens_per_s_median"]
            )
            assert draft["speedup_vs_ngram"][str(c)] == pytest.approx(
                rate / ngram["levels"][str(c)]["tokens_per_s_median"]
            )
        rates[k] = draft["levels"]["1"]["tokens_per_s_median"]
    chosen = max(rates, key=rates.__getitem__)
    assert report["chosen_k"] == chosen
    assert report["pays"] == (report["draft"][str(chosen)]["speedup"]["1"] > 1)
    return chosen


def fit_tiny_draft(
    root: Path,
    questions: list[str],
    new_tokens: int,
    *,
    speculative_tokens: int,
    algorithm: str = "eagle3",
    steps: int = 60,
    model_type: str = "llama",
) -> dict[str, Any]:
    """A tiny verifier (of family ``model_type``) vLLM for CPU serves and a draft (``eagle3``, ``peagle`` or ``dflash``) fitted to its
    own greedy continuations of ``questions`` (so vLLM must accept the draft's tokens), saved in
    ``root/draft``. Returns the verifier folder, the draft folder, the loaded verifier model,
    its tokenizer, the prompts, the continuations and the fit's history."""
    import pytest
    import torch

    eagle3 = pytest.importorskip("speculators_eagle3")
    from collections import Counter

    from speculators_core.evaluate.vllm_drafts import fit_draft
    from speculators_core.testing import make_tiny_verifier

    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16).
    verifier = make_tiny_verifier(
        root / "verifier", model_type=model_type, num_heads=2, num_kv_heads=1
    )
    # transformers' greedy continuations: the draft's training data
    model, tokenizer, prompts, greedy = greedy_continuations(verifier, questions, new_tokens)
    counts = Counter(t for p, g in zip(prompts, greedy) for t in p + g)
    torch.manual_seed(0)  # the draft's initial weights
    common: dict[str, Any] = {
        "aux_layer_ids": [1, 2, 3],
        "draft_vocab_size": 128,  # < 259: vLLM must apply d2t
        "token_counts": dict(counts),
        "noise_std": 0.0,
        "speculative_tokens": speculative_tokens,
    }
    if algorithm == "dflash":
        dflash = pytest.importorskip("speculators_dflash")
        draft = dflash.DFlashDraftModel.from_verifier(
            verifier, block_size=speculative_tokens + 1, max_anchors=64, **common
        )
    elif algorithm == "peagle":
        # every supervised anchor at every depth: the fit sees each chain it will be asked for
        draft = eagle3.PEagleDraftModel.from_verifier(
            verifier, num_depths=speculative_tokens, max_anchors=0, **common
        )
    else:
        draft = eagle3.Eagle3DraftModel.from_verifier(verifier, ttt_steps=2, **common)
    history = fit_draft(
        draft,
        model,
        [p + g for p, g in zip(prompts, greedy)],
        [len(p) for p in prompts],
        steps=steps,
        lr=1e-2,
    )
    draft.save_pretrained(root / "draft")
    return {
        "verifier": verifier,
        "draft": root / "draft",
        "model": model,
        "tokenizer": tokenizer,
        "prompts": prompts,
        "greedy": greedy,
        "history": history,
    }


def assert_acceptance_agrees(vllm: Any, reference: Any) -> None:
    """Tolerance: mean acceptance length within 0.1, accepted counts per position within 10% (+3).

    Both decoders are greedy over identical outputs, so the accepted counts can only differ
    where the two implementations of the draft disagree on an argmax near a tie, and the
    number of rounds by how each engine counts the last round of a sequence.
    """
    assert abs(vllm.mean_acceptance_length - reference.mean_acceptance_length) <= 0.1, (
        vllm.to_json(),
        reference.to_json(),
    )
    for got, want in zip(vllm.accepted_per_position, reference.accepted_per_position):
        assert abs(got - want) <= max(3, 0.1 * want), (
            vllm.accepted_per_position,
            reference.accepted_per_position,
        )
