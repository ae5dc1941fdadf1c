"""Response regeneration: answers are the verifier's own greedy continuations; runs resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datatest_support import CHATS, write_jsonl

from speculators_core.data.chat import ChatRenderer
from speculators_core.data.prepared import PreparedDataset
from speculators_core.data.regenerate import (
    GenerationSettings,
    TransformersGenerator,
    regenerate_data,
)
from speculators_core.data.verifier import load_verifier_model


def greedy_loop(model, prompt: list[int], eos: int, max_new: int) -> list[int]:
    """Plain greedy decoding: re-run the whole sequence, take the argmax, stop at EOS."""
    ids = list(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids.append(token)
    return new


def test_regenerated_answers_are_greedy_continuations(tiny_verifier: Path, tmp_path: Path):
    """Every assistant turn equals a plain greedy loop given the (regenerated) turns before it."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS[1:3])
    out = tmp_path / "regen"
    summary = regenerate_data(
        verifier=tiny_verifier,
        sources=[data],
        output=out,
        settings=GenerationSettings(max_new_tokens=6),
        batch_size=2,
        seed=None,
    )
    regenerated = PreparedDataset.open(out)
    convs = regenerated.conversations()
    assert convs is not None and len(convs) == len(regenerated) == summary.num_samples == 2
    assert regenerated.manifest.regenerated == {
        "backend": "transformers",
        "max_new_tokens": 6,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
    }
    renderer = ChatRenderer.from_verifier(tiny_verifier)
    model = load_verifier_model(tiny_verifier)
    eos = renderer.tokenizer.eos_token_id
    originals = [CHATS[1]["messages"], CHATS[2]["messages"]]
    for conv, original in zip(convs, originals, strict=True):
        assert [t.role for t in conv] == [m["role"] for m in original]
        assert [t.content for t in conv if t.role == "user"] == [
            m["content"] for m in original if m["role"] == "user"
        ]
        for j, turn in enumerate(conv):
            if turn.role != "assistant":
                continue
            prompt = renderer.tokenizer(
                renderer.render_text(conv[:j], add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            expected = renderer.tokenizer.decode(
                greedy_loop(model, prompt, eos, 6), skip_special_tokens=True
            )
            assert turn.content == expected
    # The prepared samples are these conversations rendered and masked.
    for i, conv in enumerate(convs):
        assert regenerated[i]["input_ids"].tolist() == renderer(conv).input_ids


class _CrashAfter:
    """Wraps a generator and fails on its n-th call (a run dying mid-way)."""

    def __init__(self, inner, calls: int) -> None:
        self.inner, self.left = inner, calls

    def generate(self, prompts, settings, *, seed):
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return self.inner.generate(prompts, settings, seed=seed)


def test_interrupted_sampled_regeneration_resumes_to_the_same_result(
    tiny_verifier: Path, tmp_path: Path
):
    """Sampling is seeded per chunk: crash after one chunk, resume, compare with a clean run."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    settings = GenerationSettings(max_new_tokens=5, temperature=0.9, seed=7)
    renderer = ChatRenderer.from_verifier(tiny_verifier)
    inner = TransformersGenerator(tiny_verifier, eos_ids=set(renderer.eos_ids), batch_size=2)
    kwargs: dict[str, Any] = dict(
        verifier=tiny_verifier, sources=[data], settings=settings, chunk_size=1, batch_size=2
    )
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        regenerate_data(output=out, generator=_CrashAfter(inner, 2), **kwargs)
    assert not out.exists()
    work = tmp_path / ".resumed.partial"
    assert sorted(p.name for p in work.glob("chunk-*")) == ["chunk-00000.jsonl"]
    regenerate_data(output=out, generator=inner, **kwargs)
    clean = tmp_path / "clean"
    regenerate_data(output=clean, generator=inner, **kwargs)
    assert not work.exists()
    assert (out / "conversations.jsonl").read_text() == (clean / "conversations.jsonl").read_text()
    a, b = PreparedDataset.open(out), PreparedDataset.open(clean)
    assert [s["input_ids"].tolist() for s in a] == [s["input_ids"].tolist() for s in b]


@pytest.mark.slow
def test_smollm2_regenerates_a_sensible_answer(smollm2: Path, tmp_path: Path):
    """The real verifier answers the capital question as it does on its own."""
    data = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Lyon?"},
                ]
            }
        ],
    )
    regenerate_data(
        verifier=smollm2,
        sources=[data],
        output=tmp_path / "r",
        settings=GenerationSettings(max_new_tokens=12),
    )
    conv = PreparedDataset.open(tmp_path / "r").conversations()
    assert conv is not None
    assert conv[0][-1].content.startswith("The capital of France is Paris")
