"""Draft-vocabulary mappings between a reduced draft vocabulary and the verifier's (FORMAT.md 1.4, 5.3).

* ``d2t[i]`` (int64, ``[Vd]``) is an **offset**: draft id ``i`` is verifier id ``i + d2t[i]``.
* ``t2d[j]`` (bool, ``[V]``) is True iff verifier id ``j`` is in the draft vocabulary.
* Draft ids are the chosen verifier ids sorted ascending.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "build_vocab_mapping",
    "check_vocab_mapping",
    "draft_to_target",
    "target_ids_of_draft_vocab",
]


def build_vocab_mapping(
    token_counts: Mapping[int, int] | torch.Tensor,
    draft_vocab_size: int,
    target_vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``draft_vocab_size`` most frequent tokens as ``(d2t, t2d)``.

    Ties are broken by the smaller id; if fewer than ``draft_vocab_size`` tokens were seen the
    smallest unseen ids fill the rest (so special tokens, which have small ids, come first).
    ``token_counts`` is a mapping id -> count or a ``[V]`` tensor of counts.
    """
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise ValueError(
            f"draft vocab size {draft_vocab_size} must be between 1 and the verifier vocab size "
            f"{target_vocab_size}"
        )
    if isinstance(token_counts, torch.Tensor):
        counts = {int(i): int(c) for i, c in enumerate(token_counts.tolist()) if c > 0}
    else:
        counts = {int(i): int(c) for i, c in token_counts.items() if c > 0}
    out_of_range = [i for i in counts if not 0 <= i < target_vocab_size]
    if out_of_range:
        raise ValueError(
            f"token ids {sorted(out_of_range)[:5]} are outside the verifier vocab of "
            f"{target_vocab_size}; the counts come from another tokenizer"
        )
    ranked = sorted(counts, key=lambda i: (-counts[i], i))[:draft_vocab_size]
    chosen = set(ranked)
    filler = 0
    while len(chosen) < draft_vocab_size:
        if filler not in chosen:
            chosen.add(filler)
        filler += 1
    ids = torch.tensor(sorted(chosen), dtype=torch.long)
    d2t = ids - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def target_ids_of_draft_vocab(d2t: torch.Tensor) -> torch.Tensor:
    """Verifier ids of draft ids ``0..Vd-1`` (``arange(Vd) + d2t``)."""
    return torch.arange(d2t.shape[0], device=d2t.device, dtype=torch.long) + d2t.long()


def draft_to_target(draft_ids: torch.Tensor, d2t: torch.Tensor | None) -> torch.Tensor:
    """Map draft-vocabulary ids to verifier ids (identity when ``d2t`` is None)."""
    if d2t is None:
        return draft_ids
    return draft_ids + d2t.to(draft_ids.device)[draft_ids]


def check_vocab_mapping(d2t: torch.Tensor, t2d: torch.Tensor | None = None) -> None:
    """Raise ValueError unless ``d2t``/``t2d`` are a consistent mapping (dtypes included)."""
    if d2t.dtype != torch.long or d2t.dim() != 1:
        raise ValueError(
            f"d2t must be a 1-D int64 tensor, got {d2t.dtype} of shape {tuple(d2t.shape)}"
        )
    target = target_ids_of_draft_vocab(d2t)
    if bool((target[1:] <= target[:-1]).any()):
        raise ValueError("d2t must map draft ids to strictly increasing verifier ids")
    if bool((target < 0).any()):
        raise ValueError("d2t maps a draft id to a negative verifier id")
    if t2d is None:
        return
    if t2d.dtype != torch.bool or t2d.dim() != 1:
        raise ValueError(
            f"t2d must be a 1-D bool tensor, got {t2d.dtype} of shape {tuple(t2d.shape)}"
        )
    if int(target.max()) >= t2d.shape[0]:
        raise ValueError("d2t maps a draft id beyond the verifier vocab size given by t2d")
    if int(t2d.sum()) != d2t.shape[0] or not bool(t2d[target].all()):
        raise ValueError("t2d does not mark exactly the verifier ids that d2t maps to")
