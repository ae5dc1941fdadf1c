"""The shard store: contents, manifest, reader, refusal of incomplete/corrupt/foreign stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datatest_support import CHATS, many_chats, write_jsonl

from speculators_core.data.capture import HiddenStateCapture
from speculators_core.data.errors import StoreError, VerifierMismatchError
from speculators_core.data.prepared import PreparedDataset, prepare_data
from speculators_core.data.store import ShardStore, capture_to_store, partial_path
from speculators_core.errors import SpeculatorsError
from speculators_core.features import HiddenStateSpec
from speculators_core.testing import make_tiny_verifier

SPEC = HiddenStateSpec((1, 2, 4))


@pytest.fixture(scope="module")
def prepared(tiny_verifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    data = write_jsonl(root / "chats.jsonl", CHATS + many_chats(8))
    out = root / "prep"
    prepare_data(verifier=tiny_verifier, sources=[data], output=out, seed=None)
    return out


@pytest.fixture(scope="module")
def store(tiny_verifier: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "hs"
    capture_to_store(
        verifier=tiny_verifier, prepared=prepared, output=out, spec=SPEC, shard_size=5, batch_size=3
    )
    return out


def test_store_holds_the_prepared_samples_and_their_states(
    store: Path, prepared: Path, tiny_verifier: Path
):
    """Ids and masks are the prepared ones; states are an unbatched capture rounded to bf16."""
    data = PreparedDataset.open(prepared)
    hs = ShardStore.open(store)
    capture = HiddenStateCapture.from_verifier(tiny_verifier, SPEC)
    assert len(hs) == len(data) == 12
    for i in range(len(hs)):
        sample = hs[i]
        assert torch.equal(sample["input_ids"], data[i]["input_ids"])
        assert torch.equal(sample["loss_mask"], data[i]["loss_mask"])
        assert sample["input_ids"].dtype == torch.long and sample["loss_mask"].dtype == torch.long
        assert sample["hidden_states"].dtype == torch.bfloat16
        assert hs.num_tokens(i) == data.num_tokens(i) == sample["input_ids"].numel()
        ref = capture.capture(data[i]["input_ids"])
        torch.testing.assert_close(sample["hidden_states"].float(), ref, rtol=1e-2, atol=1e-2)


def test_manifest_records_what_the_store_is(store: Path, prepared: Path, tiny_verifier: Path):
    """Verifier, fingerprint, spec and semantics, dtype, source, counts."""
    from speculators_core.data.fingerprint import verifier_fingerprint

    m = ShardStore.open(store).manifest
    data = PreparedDataset.open(prepared)
    assert m.verifier_path == str(tiny_verifier.resolve())
    assert m.verifier_fingerprint == verifier_fingerprint(tiny_verifier)
    assert m.spec == SPEC and m.hidden_size == 64 and m.verifier_num_layers == 4
    assert m.dtype == torch.bfloat16
    assert m.layer_semantics[-1].startswith("4: final decoder output before the final norm")
    assert m.num_samples == 12 and len(m.shards) == 3
    assert m.sample_num_tokens == [data.num_tokens(i) for i in range(12)]
    assert m.num_tokens == data.manifest.num_tokens
    assert m.num_supervised_tokens == data.manifest.num_supervised_tokens
    assert m.split == "train" and m.source["seq_length"] == 2048


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selectable_dtypes(tiny_verifier: Path, prepared: Path, tmp_path: Path, dtype):
    """fp32 keeps the compute precision; fp16 is stored as fp16."""
    out = tmp_path / "hs"
    capture_to_store(
        verifier=tiny_verifier, prepared=prepared, output=out, spec=SPEC, dtype=dtype, max_samples=3
    )
    hs = ShardStore.open(out)
    assert len(hs) == 3 and hs.manifest.dtype == dtype and hs[0]["hidden_states"].dtype == dtype
    if dtype == torch.float32:
        ref = HiddenStateCapture.from_verifier(tiny_verifier, SPEC).capture(hs[0]["input_ids"])
        torch.testing.assert_close(hs[0]["hidden_states"], ref, rtol=1e-4, atol=1e-4)


def test_existing_store_is_not_overwritten_without_flag(
    store: Path, tiny_verifier: Path, prepared: Path
):
    """A second run to the same output is refused unless --overwrite."""
    with pytest.raises(StoreError, match="already exists"):
        capture_to_store(verifier=tiny_verifier, prepared=prepared, output=store, spec=SPEC)


def test_missing_incomplete_and_corrupt_stores(store: Path, tmp_path: Path):
    """Each unusable store is one line that says what is wrong."""
    with pytest.raises(StoreError, match="does not exist"):
        ShardStore.open(tmp_path / "nothing")
    partial_path(tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="is incomplete: a run was interrupted"):
        ShardStore.open(tmp_path / "half")
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"is corrupt: shard-00001\.safetensors"):
        ShardStore.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not a finished hidden-state store"):
        ShardStore.open(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="is not a hidden-state store"):
        ShardStore.open(copy)


def test_store_from_another_verifier_is_refused(
    store: Path, tiny_verifier: Path, other_verifier: Path
):
    """Same shapes, other weights: the fingerprint check names both verifiers."""
    hs = ShardStore.open(store)
    hs.check_verifier(tiny_verifier)  # the right one passes
    with pytest.raises(VerifierMismatchError) as info:
        hs.check_verifier(other_verifier)
    text = str(info.value)
    assert f"store '{store}' was made from verifier '{tiny_verifier.resolve()}'" in text
    assert f"not '{other_verifier}'" in text and "\n" not in text


def test_resuming_with_another_verifier_is_refused(
    tiny_verifier: Path, other_verifier: Path, prepared: Path, tmp_path: Path
):
    """An interrupted run's folder belongs to its verifier."""
    out = tmp_path / "hs"
    work = partial_path(out)
    work.mkdir()
    from speculators_core.data.fingerprint import verifier_fingerprint

    (work / "run.json").write_text(
        json.dumps(
            {
                "verifier_path": str(tiny_verifier),
                "verifier_fingerprint": verifier_fingerprint(tiny_verifier),
            }
        )
    )
    with pytest.raises(VerifierMismatchError, match="was made from verifier"):
        capture_to_store(verifier=other_verifier, prepared=prepared, output=out, spec=SPEC)
    assert not out.exists()


def test_prepared_with_another_tokenizer_is_refused(prepared: Path, tmp_path: Path):
    """Token ids from one tokenizer are meaningless to a verifier with another."""
    foreign = make_tiny_verifier(tmp_path / "foreign", vocab_size=300)
    with pytest.raises(VerifierMismatchError, match="was tokenized with the tokenizer of verifier"):
        capture_to_store(verifier=foreign, prepared=prepared, output=tmp_path / "hs", spec=SPEC)
    assert not (tmp_path / "hs").exists() and not partial_path(tmp_path / "hs").exists()


def test_layer_ids_beyond_the_verifier(tiny_verifier: Path, prepared: Path, tmp_path: Path):
    """Nothing is written for an impossible spec."""
    with pytest.raises(SpeculatorsError, match=r"outside 0\.\.4"):
        capture_to_store(
            verifier=tiny_verifier,
            prepared=prepared,
            output=tmp_path / "hs",
            spec=HiddenStateSpec((2, 7)),
        )
    assert list(tmp_path.iterdir()) == []


def test_store_streams_in_a_dataloader(store: Path):
    """A map-style dataset: a DataLoader with a worker process reads the same samples."""
    hs = ShardStore.open(store)
    loader = torch.utils.data.DataLoader(hs, batch_size=None, num_workers=1)
    for i, sample in enumerate(loader):
        assert torch.equal(sample["hidden_states"], hs[i]["hidden_states"])
    assert i == len(hs) - 1
