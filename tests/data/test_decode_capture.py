"""One-pass regeneration + capture: the answers are greedy, the states those of a fresh prefill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datatest_support import write_jsonl

from speculators_core.data.capture import HiddenStateCapture, StateRecorder
from speculators_core.data.chat import ChatRenderer
from speculators_core.data.decode_capture import decode_with_states, regenerate_to_store
from speculators_core.data.errors import DataSourceError
from speculators_core.data.prepared import PreparedDataset
from speculators_core.data.store import ShardStore, partial_path
from speculators_core.data.verifier import load_verifier_model
from speculators_core.features import HiddenStateSpec

SPEC = HiddenStateSpec(layer_ids=(1, 2, 4))


def _greedy(model, prompt: list[int], eos: set[int], limit: int) -> list[int]:
    """Plain greedy loop: rerun the whole sequence for each token; the EOS token is kept."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(limit):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token in eos:
                break
    return new


def _chats(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    chats = []
    for i in range(n):
        question = " ".join(words[(i + j) % len(words)] for j in range(1 + 3 * i % 11))
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}: {question}?"},
                    {"role": "assistant", "content": "an answer that will be replaced"},
                    {"role": "user", "content": "a later turn, dropped"},
                    {"role": "assistant", "content": "dropped too"},
                ]
            }
        )
    return chats


def test_decoding_matches_greedy_loop_and_fresh_prefill(tiny_verifier: Path):
    """Batched, left-padded, compacted decoding = an unbatched greedy loop; states = a prefill."""
    renderer = ChatRenderer.from_verifier(tiny_verifier)
    model = load_verifier_model(tiny_verifier)
    eos = set(renderer.eos_ids)
    prompts = [
        renderer.tokenizer(
            renderer.tokenizer.apply_chat_template(
                [{"role": "user", "content": c["messages"][0]["content"]}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
        for c in _chats(7)
    ]
    assert len({len(p) for p in prompts}) > 2  # really left-padded
    limits = [3, 12, 1, 20, 7, 20, 5]
    with StateRecorder(model, SPEC) as recorder:
        decoded = decode_with_states(
            model,
            recorder,
            prompts,
            limits=limits,
            eos_ids=eos,
            pad_id=0,
            state_dtype=torch.float32,
        )
    capture = HiddenStateCapture(model, SPEC)
    for prompt, limit, result in zip(prompts, limits, decoded, strict=True):
        expected = _greedy(model, prompt, eos, limit)
        assert result.answer == expected
        assert result.finished == (expected[-1] in eos)
        full = torch.tensor(prompt + expected)
        reference = capture.capture(full)
        assert result.states.shape == reference.shape == (len(full), 3, 64)
        torch.testing.assert_close(result.states, reference, atol=2e-5, rtol=1e-4)


def test_regenerate_to_store_writes_prepared_data_and_store(tiny_verifier: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(9))
    prepared, store = tmp_path / "prepared", tmp_path / "store"
    data_summary, store_summary = regenerate_to_store(
        verifier=tiny_verifier,
        sources=[data],
        prepared_output=prepared,
        store_output=store,
        spec=SPEC,
        max_new_tokens=9,
        seq_length=256,
        seed=None,
        batch_size=4,  # 3 shards, the last one short
        store_dtype=torch.float32,
    )
    model = load_verifier_model(tiny_verifier)
    renderer = ChatRenderer.from_verifier(tiny_verifier)
    eos = set(renderer.eos_ids)
    capture = HiddenStateCapture(model, SPEC)
    opened = ShardStore.open(store)
    ready = PreparedDataset.open(prepared)
    convs = ready.conversations()
    assert convs is not None
    assert len(opened) == len(ready) == len(convs) == 9
    assert data_summary.num_samples == store_summary.num_samples == 9
    assert opened.manifest.num_supervised_tokens == ready.manifest.num_supervised_tokens
    expected_prompts = []
    for chat in _chats(9):
        prompt_text = renderer.tokenizer.apply_chat_template(
            [{"role": "user", "content": chat["messages"][0]["content"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        expected_prompts.append(
            renderer.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        )
    # Samples are stored by prompt length (stable), the order the batches were decoded in.
    expected_prompts.sort(key=len)
    assert len({len(p) for p in expected_prompts}) > 2
    for i, prompt in enumerate(expected_prompts):
        answer = _greedy(model, prompt, eos, 9)
        sample, row = opened[i], ready[i]
        assert sample["input_ids"].tolist() == row["input_ids"].tolist() == prompt + answer
        mask = [0] * len(prompt) + [1] * len(answer)
        assert sample["loss_mask"].tolist() == row["loss_mask"].tolist() == mask
        reference = capture.capture(torch.tensor(prompt + answer))
        torch.testing.assert_close(sample["hidden_states"], reference, atol=2e-5, rtol=1e-4)
        # Only the first turn, answered by the verifier.
        assert [t.role for t in convs[i]] == ["user", "assistant"]
        assert convs[i][1].content == renderer.tokenizer.decode(answer, skip_special_tokens=True)
    assert ready.manifest.regenerated["backend"] == "transformers-decode-capture"
    assert opened.manifest.layer_ids == [1, 2, 4]


def test_rerun_resumes_finished_shards(tiny_verifier: Path, tmp_path: Path, monkeypatch):
    """Shards written before an interruption are kept; only the missing ones are decoded."""
    import speculators_core.data.decode_capture as module

    data = write_jsonl(tmp_path / "chats.jsonl", _chats(6))
    kwargs = dict(
        verifier=tiny_verifier,
        sources=[data],
        prepared_output=tmp_path / "prepared",
        store_output=tmp_path / "store",
        spec=SPEC,
        max_new_tokens=5,
        seq_length=256,
        seed=None,
        batch_size=2,
    )
    real = module.decode_with_states
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(module, "decode_with_states", flaky)
    with pytest.raises(KeyboardInterrupt):
        regenerate_to_store(**kwargs)
    assert not (tmp_path / "store").exists() and not (tmp_path / "prepared").exists()
    assert len(list(partial_path(tmp_path / "store").glob("shard-*.safetensors"))) == 1
    calls["n"] = 10  # no more failures
    _, store_summary = regenerate_to_store(**kwargs)
    assert calls["n"] == 12  # two shards decoded on the rerun, not three
    assert store_summary.notes == ["resumed with 1 of 3 shards done"]
    assert len(ShardStore.open(tmp_path / "store")) == 6
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6


def test_existing_output_is_refused(tiny_verifier: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(2))
    (tmp_path / "prepared").mkdir()
    with pytest.raises(DataSourceError, match="already exists"):
        regenerate_to_store(
            verifier=tiny_verifier,
            sources=[data],
            prepared_output=tmp_path / "prepared",
            store_output=tmp_path / "store",
            spec=SPEC,
        )
    assert not (tmp_path / "store").exists()
