"""Token frequencies over supervised tokens, and the draft vocabulary built from them.

``token_freq.json`` (written by ``speculators data vocab``)::

    {"format": "speculators-token-freq", "format_version": 1, "vocab_size": V,
     "num_supervised_tokens": T, "source": "...", "counts": {"<token id>": count, ...}}

Only tokens with ``loss_mask == 1`` are counted: the draft vocabulary should cover what the
assistant says, not the prompts. With a draft vocabulary size, ``d2t.npy`` (int64 ``[Vd]``) and
``t2d.npy`` (bool ``[V]``) are written as upstream's ``build_vocab_mapping.py`` writes them,
from :func:`speculators_core.vocab.build_vocab_mapping` (FORMAT.md 5.3).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculators_core.data.errors import DataSourceError
from speculators_core.data.summary import DataSummary
from speculators_core.fsutil import atomic_file
from speculators_core.vocab import build_vocab_mapping

__all__ = [
    "D2T_NAME",
    "T2D_NAME",
    "TOKEN_FREQ_NAME",
    "build_draft_vocab",
    "count_token_frequencies",
    "load_token_counts",
    "load_vocab_mapping",
    "save_token_counts",
    "token_arrays",
]

TOKEN_FREQ_NAME = "token_freq.json"
TOKEN_FREQ_FORMAT = "speculators-token-freq"
D2T_NAME = "d2t.npy"
T2D_NAME = "t2d.npy"


def count_token_frequencies(
    arrays: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int
) -> torch.Tensor:
    """Counts ``[vocab_size]`` (int64) of the ids whose loss mask is 1, over ``(ids, mask)`` pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids, mask in arrays:
        chosen = ids.reshape(-1).long()[mask.reshape(-1) > 0]
        if chosen.numel() and (int(chosen.max()) >= vocab_size or int(chosen.min()) < 0):
            raise DataSourceError(
                f"token id {int(chosen.max())} is outside the vocab of {vocab_size}; pass the "
                "verifier's vocab size (--target-vocab-size)"
            )
        counts += torch.bincount(chosen, minlength=vocab_size)
    return counts


def token_arrays(
    path: str | os.PathLike[str],
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """``(ids, mask)`` pairs of a store or prepared-data folder, its vocab size and sample count.

    A store is read shard by shard without touching its hidden states.
    """
    from speculators_core.data.prepared import PreparedDataset
    from speculators_core.data.store import STORE_FORMAT, ShardStore

    folder = Path(path)
    manifest = folder / "manifest.json"
    if not folder.exists():
        raise DataSourceError(
            f"'{folder}' does not exist; pass a hidden-state store or prepared data"
        )
    fmt = None
    if manifest.is_file():
        try:
            fmt = json.loads(manifest.read_text()).get("format")
        except (json.JSONDecodeError, AttributeError):
            fmt = None
    if fmt == STORE_FORMAT:
        store = ShardStore.open(folder)

        def shards() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            from safetensors import safe_open

            for shard in store.manifest.shards:
                with safe_open(str(folder / shard.file), framework="pt") as handle:
                    yield handle.get_tensor("input_ids"), handle.get_tensor("loss_mask")

        return shards(), store.manifest.vocab_size, len(store)
    prepared = PreparedDataset.open(folder)  # raises a clear error for anything else
    pairs = [(s["input_ids"], s["loss_mask"]) for s in prepared]
    return pairs, prepared.manifest.vocab_size, len(prepared)


def save_token_counts(
    path: str | os.PathLike[str], counts: torch.Tensor, *, source: str = ""
) -> Path:
    """Write ``token_freq.json`` (atomically) from a ``[V]`` counts tensor."""
    data = {
        "format": TOKEN_FREQ_FORMAT,
        "format_version": 1,
        "vocab_size": int(counts.numel()),
        "num_supervised_tokens": int(counts.sum()),
        "source": source,
        "counts": {str(i): int(c) for i, c in enumerate(counts.tolist()) if c > 0},
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data) + "\n")
    return Path(path)


def load_token_counts(path: str | os.PathLike[str]) -> dict[int, int]:
    """Token counts ``{id: count}`` from our ``token_freq.json`` or upstream's ``token_freq.pt``.

    Upstream's file is ``torch.save`` of a dict id -> count (or a counts tensor). ``path`` may
    also be the folder that holds ``token_freq.json``.
    """
    file = Path(path)
    if file.is_dir():
        file = file / TOKEN_FREQ_NAME
    if not file.is_file():
        raise DataSourceError(
            f"token counts '{file}' do not exist; make them with 'speculators data vocab'"
        )
    if file.suffix == ".json":
        try:
            data = json.loads(file.read_text())
            return {int(k): int(v) for k, v in data["counts"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataSourceError(f"'{file}' is not a token-frequency file ({err!r})") from None
    try:
        loaded: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataSourceError(
            f"'{file}' is not a token-frequency file ({type(err).__name__})"
        ) from None
    if isinstance(loaded, torch.Tensor):
        return {i: int(c) for i, c in enumerate(loaded.tolist()) if c > 0}
    if isinstance(loaded, dict):
        return {int(k): int(v) for k, v in loaded.items()}
    raise DataSourceError(f"'{file}' holds a {type(loaded).__name__}, not token counts")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def load_vocab_mapping(folder: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t, t2d)`` tensors from a folder with ``d2t.npy`` and ``t2d.npy``."""
    root = Path(folder)
    try:
        d2t = torch.from_numpy(np.load(root / D2T_NAME)).long()
        t2d = torch.from_numpy(np.load(root / T2D_NAME)).bool()
    except (OSError, ValueError) as err:
        raise DataSourceError(f"no readable {D2T_NAME}/{T2D_NAME} in '{root}' ({err})") from None
    return d2t, t2d


def build_draft_vocab(
    *,
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    draft_vocab_size: int | None = None,
    target_vocab_size: int | None = None,
) -> DataSummary:
    """Count supervised tokens of a store or prepared data; write counts and optionally d2t/t2d."""
    start = time.perf_counter()
    arrays, recorded_vocab, num_samples = token_arrays(data)
    vocab = target_vocab_size or recorded_vocab
    counts = count_token_frequencies(arrays, vocab)
    mapping = None
    if draft_vocab_size is not None:
        # Before anything is written: a refused size leaves no output behind.
        try:
            mapping = build_vocab_mapping(counts, draft_vocab_size, vocab)
        except ValueError as err:
            raise DataSourceError(f"{err}; choose --draft-vocab-size accordingly") from None
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_token_counts(out / TOKEN_FREQ_NAME, counts, source=str(Path(data).resolve()))
    written = [out / TOKEN_FREQ_NAME]
    notes = [f"{int((counts > 0).sum()):,} distinct tokens"]
    if draft_vocab_size is not None and mapping is not None:
        d2t, t2d = mapping
        _save_npy(out / D2T_NAME, d2t.numpy())
        _save_npy(out / T2D_NAME, t2d.numpy())
        written += [out / D2T_NAME, out / T2D_NAME]
        top = counts[d2t + torch.arange(draft_vocab_size)].sum()
        total = max(int(counts.sum()), 1)
        notes.append(
            f"draft vocab {draft_vocab_size:,} covers {float(top) / total:.1%} of supervised tokens"
        )
    total_tokens = int(counts.sum())
    return DataSummary(
        action="counted supervised tokens of",
        output=str(out),
        num_samples=num_samples,
        num_tokens=total_tokens,
        num_supervised_tokens=total_tokens,
        bytes_written=sum(p.stat().st_size for p in written),
        seconds=time.perf_counter() - start,
        tokens_processed=total_tokens,
        notes=notes,
    )
