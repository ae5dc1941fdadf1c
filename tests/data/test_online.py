"""Online mode yields the samples an offline store holds, computed in-process."""

from __future__ import annotations

from pathlib import Path

import torch

from speculators_core.data.capture import HiddenStateCapture
from speculators_core.data.online import OnlineHiddenStates
from speculators_core.data.prepared import PreparedDataset, prepare_data
from speculators_core.data.store import ShardStore, capture_to_store
from speculators_core.features import HiddenStateSpec

SPEC = HiddenStateSpec((1, 3, 4))


def test_online_equals_offline_store(tiny_verifier: Path, chat_file: Path, tmp_path: Path):
    """Same ids, masks and (bf16) states as the store; order preserved; no file written."""
    prep = tmp_path / "prep"
    prepare_data(verifier=tiny_verifier, sources=[chat_file], output=prep, seed=None)
    data = PreparedDataset.open(prep)
    store_dir = tmp_path / "hs"
    capture_to_store(
        verifier=tiny_verifier, prepared=data, output=store_dir, spec=SPEC, batch_size=3
    )
    store = ShardStore.open(store_dir)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    online = OnlineHiddenStates(tiny_verifier, SPEC, data, batch_size=3, dtype=torch.bfloat16)
    assert len(online) == len(data)
    samples = list(online)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert len(samples) == len(store)
    for got, want in zip(samples, store, strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["loss_mask"], want["loss_mask"])
        assert got["hidden_states"].dtype == torch.bfloat16
        torch.testing.assert_close(
            got["hidden_states"].float(), want["hidden_states"].float(), rtol=1e-2, atol=1e-2
        )


def test_online_with_a_loaded_model_and_a_generator(tiny_verifier: Path):
    """A loaded model and a one-shot iterable work; states equal an unbatched capture."""
    capture = HiddenStateCapture.from_verifier(tiny_verifier, SPEC)
    samples = [
        {"input_ids": torch.arange(n) + 3, "loss_mask": torch.ones(n, dtype=torch.long)}
        for n in (4, 9, 2)
    ]
    online = OnlineHiddenStates(capture.model, SPEC, iter(samples), batch_size=2)
    out = list(online)
    assert [o["input_ids"].numel() for o in out] == [4, 9, 2]
    for o, s in zip(out, samples, strict=True):
        torch.testing.assert_close(
            o["hidden_states"], capture.capture(s["input_ids"]), rtol=1e-4, atol=1e-4
        )
