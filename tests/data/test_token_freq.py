"""Supervised-token frequencies and the draft vocabulary (d2t, t2d)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from speculators_core.data.errors import DataSourceError
from speculators_core.data.prepared import PreparedDataset, prepare_data
from speculators_core.data.store import capture_to_store
from speculators_core.data.token_freq import (
    build_draft_vocab,
    load_token_counts,
    load_vocab_mapping,
)
from speculators_core.features import HiddenStateSpec


@pytest.fixture()
def prepared(tiny_verifier: Path, chat_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "prep"
    prepare_data(verifier=tiny_verifier, sources=[chat_file], output=out)
    return out


def plain_counts(prepared: Path) -> Counter:
    """A plain loop over every token of every sample, counting where the mask is 1."""
    counts: Counter = Counter()
    for sample in PreparedDataset.open(prepared):
        for token, m in zip(
            sample["input_ids"].tolist(), sample["loss_mask"].tolist(), strict=True
        ):
            if m == 1:
                counts[token] += 1
    return counts


def test_counts_cover_supervised_tokens_only(prepared: Path, tmp_path: Path, tiny_verifier: Path):
    """Prepared data and its store give the same counts as the plain loop."""
    expected = plain_counts(prepared)
    build_draft_vocab(data=prepared, output=tmp_path / "v1")
    assert load_token_counts(tmp_path / "v1" / "token_freq.json") == dict(expected)
    store = tmp_path / "hs"
    capture_to_store(
        verifier=tiny_verifier,
        prepared=prepared,
        output=store,
        spec=HiddenStateSpec((4,)),
        shard_size=2,
    )
    build_draft_vocab(data=store, output=tmp_path / "v2")
    assert load_token_counts(tmp_path / "v2") == dict(expected)


def test_draft_vocab_is_the_most_frequent_tokens(prepared: Path, tmp_path: Path):
    """d2t/t2d pick the top tokens by (count desc, id asc), then the smallest unseen ids."""
    counts = plain_counts(prepared)
    vocab = PreparedDataset.open(prepared).manifest.vocab_size
    size = len(counts) + 3  # more than were seen: filler ids come in
    build_draft_vocab(data=prepared, output=tmp_path / "v", draft_vocab_size=size)
    d2t, t2d = load_vocab_mapping(tmp_path / "v")
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    fillers = [i for i in range(vocab) if i not in counts][:3]
    expected = sorted(ranked + fillers)
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool
    assert (torch.arange(size) + d2t).tolist() == expected
    assert t2d.shape == (vocab,) and torch.nonzero(t2d).flatten().tolist() == expected
    assert np.load(tmp_path / "v" / "d2t.npy").dtype == np.int64


def test_upstream_token_freq_pt_is_readable(tmp_path: Path):
    """Upstream writes torch.save({id: count}); a counts tensor is accepted as well."""
    torch.save({5: 3, 9: 1}, tmp_path / "token_freq.pt")
    assert load_token_counts(tmp_path / "token_freq.pt") == {5: 3, 9: 1}
    torch.save(torch.tensor([0, 2, 0, 7]), tmp_path / "counts.pt")
    assert load_token_counts(tmp_path / "counts.pt") == {1: 2, 3: 7}


def test_bad_vocab_inputs(prepared: Path, tmp_path: Path):
    """Too large a draft vocab, a non-data folder, a missing counts file: one line each."""
    with pytest.raises(DataSourceError, match="must be between 1 and the verifier vocab size"):
        build_draft_vocab(data=prepared, output=tmp_path / "v", draft_vocab_size=10**6)
    assert not (tmp_path / "v").exists()  # refused before anything (token_freq.json) is written
    with pytest.raises(DataSourceError, match="does not exist"):
        build_draft_vocab(data=tmp_path / "nothing", output=tmp_path / "v")
    with pytest.raises(DataSourceError, match="do not exist"):
        load_token_counts(tmp_path / "missing.json")
