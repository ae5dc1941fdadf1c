"""The parallel drafters made the way a user makes them, on SmolLM2, then served by real vLLM.

``speculators data prepare`` (embedded ShareGPT) -> ``speculators data hidden-states`` (the states
EAGLE-3, P-EAGLE and DFlash share) -> ``speculators train --algorithm peagle`` and
``--algorithm dflash``, every step a CLI subprocess; then one vLLM worker runs SmolLM2 alone and
with each trained ``final/`` folder on chat prompts it has not seen. Greedy speculative decoding
must give the verifier's own output token for token, and vLLM must have drafted k tokens per
round. A few training steps make a weak draft: losslessness and loading are the point here;
acceptance is measured by ``benchmarks/bench_algorithms.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _support import chat_prompts, run_cli

from speculators_core import PluginHost
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmJob, run_vllm_jobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

K = 3
STEPS = 6
QUESTIONS = ["Give me two facts about the Moon.", "How do I boil an egg?"]
ALGORITHMS = {
    "peagle": ["--algo-opt", f"num_depths={K}"],
    "dflash": ["--algo-opt", f"block_size={K + 1}", "--algo-opt", "max_anchors=64"],
}


def _cli(args: list[Any]) -> None:
    result = run_cli([str(a) for a in args], env={"SPECULATORS_STRICT_PLUGINS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("speculators_eagle3")
    pytest.importorskip("speculators_dflash")
    from transformers import AutoTokenizer

    from speculators_core.assets import MissingPackageError, smollm2_path

    try:
        verifier = smollm2_path()
    except MissingPackageError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("smollm2-cli")
    prepared, store = root / "prepared", root / "store"
    _cli(["data", "prepare", "--verifier", "smollm2", "--data", "sharegpt", "--output", prepared,
          "--max-samples", 8, "--seq-length", 512])  # fmt: skip
    _cli(["data", "hidden-states", "--verifier", "smollm2", "--prepared", prepared,
          "--output", store, "--algorithm", "eagle3", "--batch-size", 4])  # fmt: skip
    folders: dict[str, Path] = {}
    for name, options in ALGORITHMS.items():
        out = root / f"run-{name}"
        _cli(["train", "--algorithm", name, "--verifier", "smollm2", "--data", store,
              "--output", out, "--draft-vocab-size", 4096, "--seq-len", 512,
              "--max-steps", STEPS, "--learning-rate", "1e-3", "--val-fraction", 0,
              "--log-every", 1, "--no-progress", "--no-console-log", *options])  # fmt: skip
        folders[name] = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    common: dict[str, Any] = {
        "prompts": chat_prompts(tokenizer, QUESTIONS),
        "k": K,
        "max_new_tokens": 32,
        "max_model_len": 512,
        "host": PluginHost(),  # the installed plugins say how vLLM serves each draft
    }
    results = run_vllm_jobs(
        [VllmJob(verifier=verifier, draft=None, **common)]
        + [VllmJob(verifier=verifier, draft=folder, **common) for folder in folders.values()]
    )
    return {
        "root": root,
        "folders": folders,
        "baseline": results[0],
        **dict(zip(folders, results[1:], strict=True)),
    }


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_cli_trained_draft_is_lossless_in_vllm(run: dict[str, Any], algorithm: str) -> None:
    folder = run["folders"][algorithm]
    config = json.loads((folder / "config.json").read_text())
    assert config["speculators_model_type"] == algorithm
    assert config["draft_vocab_size"] == 4096
    lines = (folder.parent / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert check_checkpoint(folder, host=PluginHost()).findings == []
    baseline, speculative = run["baseline"], run[algorithm]
    assert all(len(o) > 0 for o in baseline.outputs)
    assert speculative.outputs == baseline.outputs  # greedy speculative decoding is lossless
    assert speculative.num_drafts > 0
    assert speculative.num_draft_tokens == K * speculative.num_drafts
