"""Verifier families through the whole pipeline, each a tiny random model built here.

For every family of :data:`speculators_core.testing.VERIFIER_FAMILIES` (Llama, Mistral,
Qwen2 with attention biases, Qwen3, the Qwen3-MoE mixture of experts, Gemma 2 and Gemma 3 with
sliding-window layers, gpt-oss with experts and sliding windows) and the vision-language verifiers
of :data:`~speculators_core.testing.VISION_LANGUAGE_FAMILIES` (Qwen2.5-VL, Qwen3-VL: the text
model in ``text_config``, text-only conversations): ``data prepare`` -> ``data
hidden-states`` -> ``data vocab`` -> ``train`` (EAGLE-3, P-EAGLE and DFlash on the same store) ->
``check``, all through the CLI, then the reference decoder with each trained draft against transformers' own greedy ``generate`` of the
verifier (an independent decoder): the tokens must be the same, whatever the draft proposed.
The prompts are longer than the sliding window, so the windowed families decode past it with
rolled-back rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from speculators_core.cli.main import cli
from speculators_core.testing import VERIFIER_FAMILIES, VISION_LANGUAGE_FAMILIES, make_tiny_verifier

FAMILIES = [*VERIFIER_FAMILIES, *VISION_LANGUAGE_FAMILIES]
K = 3
#: Each algorithm's training options for k = 3 (EAGLE-3's are its defaults).
ALGORITHMS: dict[str, list[str]] = {
    "eagle3": [],
    "peagle": ["--algo-opt", f"num_depths={K}"],
    "dflash": ["--algo-opt", f"block_size={K + 1}", "--algo-opt", "max_anchors=16"],
}
QUESTIONS = [
    "tell me about the weather in the mountains and the sea today",
    "what is the best way to learn a new language quickly and well",
]


def _chats(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(16):
            record = {
                "messages": [
                    {"role": "user", "content": f"question {i}: {QUESTIONS[i % 2]}"},
                    {"role": "assistant", "content": f"answer {i}: the model writes {i * 7} words"},
                ]
            }
            handle.write(json.dumps(record) + "\n")
    return path


def _run(args: list[object]) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_the_pipeline(family: str, tmp_path: Path) -> None:
    from _support import chat_prompts
    from transformers import AutoTokenizer

    from speculators_core.data.verifier import load_verifier_model
    from speculators_core.evaluate.reference import ReferenceDecoder
    from speculators_core.loading import load_speculator

    verifier = make_tiny_verifier(tmp_path / "verifier", model_type=family, num_layers=8)
    data = _chats(tmp_path / "chats.jsonl")
    _run(["data", "prepare", "--verifier", verifier, "--data", data, "--output",
          tmp_path / "prepared", "--seq-length", 128])  # fmt: skip
    _run(["data", "hidden-states", "--verifier", verifier, "--prepared", tmp_path / "prepared",
          "--output", tmp_path / "store", "--algorithm", "eagle3"])  # fmt: skip
    _run(["data", "vocab", "--data", tmp_path / "store", "--output", tmp_path / "vocab",
          "--draft-vocab-size", 128])  # fmt: skip
    model = load_verifier_model(verifier)  # transformers' own class for the family
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = chat_prompts(tokenizer, QUESTIONS)
    with torch.no_grad():
        expected = [
            model.generate(
                torch.tensor([prompt]),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0].tolist()[len(prompt) :]
            for prompt in prompts
        ]
    for algorithm, options in ALGORITHMS.items():
        run = tmp_path / f"run-{algorithm}"
        _run(["train", "--algorithm", algorithm, "--verifier", verifier, "--data",
              tmp_path / "store", "--output", run, "--vocab", tmp_path / "vocab",
              "--draft-vocab-size", 128, "--seq-len", 128, "--max-steps", 4,
              "--learning-rate", "1e-3", "--val-fraction", 0, "--no-progress",
              "--no-console-log", *options])  # fmt: skip
        _run(["check", run / "final"])
        draft = load_speculator(run / "final", verifier=verifier)
        decoder = ReferenceDecoder(model, draft, k=K)
        decoder.eos = set()  # decode exactly as many tokens as generate() did
        for prompt, want in zip(prompts, expected, strict=True):
            assert len(prompt) > 8  # past the tiny sliding window of the windowed families
            result = decoder.generate(prompt, max_new_tokens=16)
            assert result.tokens == want, (family, algorithm)
            assert result.stats.rounds > 0


def test_per_layer_type_rope_gives_the_draft_the_full_attention_one(tmp_path: Path) -> None:
    """Gemma 3 has one RoPE for sliding layers and one for full ones; the draft attends to the
    whole context, so its layers take the full-attention RoPE."""
    from speculators_core.modeling.config import draft_layer_fields
    from speculators_core.modeling.verifier import load_verifier_config

    verifier = make_tiny_verifier(tmp_path / "v", model_type="gemma3_text", num_layers=8)
    vconfig = load_verifier_config(verifier)
    per_type = vconfig.rope_parameters
    assert per_type["full_attention"] != per_type["sliding_attention"]
    fields = draft_layer_fields(vconfig)
    assert fields["rope_parameters"] == dict(per_type["full_attention"])
