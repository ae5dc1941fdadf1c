"""Next-token alignment of a packed batch and the harmonized context alignment of HASS.

**Alignment** (FORMAT.md 3.5, within each document of a packed row). The core hands over rows as
the verifier saw them: token ``x_t``, its verifier feature ``f_t`` (the final, post-norm hidden
state), loss mask ``l_t``, position ``p_t`` and document ``d_t``. An EAGLE-1 draft pairs the
feature of position ``t`` with the *next* token and predicts the next feature, so after alignment
index ``t`` holds:

* token ``x_{t+1}`` and input feature ``f_t`` (what the draft reads),
* target feature ``f_{t+1}`` (what it should predict; its LM-head distribution is the
  verifier's distribution of ``x_{t+2}``),
* weight ``l_{t+1}`` (the mask of the token the draft reads, as the EAGLE-3 plugin does; HASS's
  own data uses ``l_t``, which leaves the first drafting position of every answer unsupervised),
* position ``p_t`` (the position vLLM gives this pair),
* document ``d_t``, or -1 when ``t`` is the last token of its document or padding (it takes no
  part: nothing follows it there).

**Harmonized context alignment.** HASS runs the draft ``S`` times over the same row. Step ``s``
(0-based) feeds at index ``t`` the feature of *level* ``s``: level 0 is the true ``f_t``; level
``k >= 1`` at index ``t`` is the (detached) prediction step ``k - 1`` made at index ``t - 1`` (an
estimate of ``f_t``), except at the first index of a document, which keeps the level below (so
every level starts from the true first feature, as HASS's ``cat[f_0, predict[:-1]]`` does).
Queries come from the newest level, keys and values from every level computed so far: at step
``s`` query ``r`` sees level 0 (true features) at indices ``j <= r - s`` and level ``k`` at index
``r - s + k`` only, all within its document. So the query at ``r`` sees the true context up to
``r - s`` and its own ``s`` earlier predictions after it: exactly what drafting sees when the
``(s+1)``-th token is drafted after a verified context ending at ``r - s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculators_core.modeling import has_next_in_document, shift_left

__all__ = [
    "AlignedBatch",
    "align_batch",
    "document_lengths",
    "document_starts",
    "hass_attention_mask",
    "next_level_features",
]


@dataclass
class AlignedBatch:
    """A packed batch after the within-document next-token shift (shapes ``[B, T, ...]``)."""

    input_ids: torch.Tensor  # [B, T] int64: x_{t+1} (0 where none)
    features: torch.Tensor  # [B, T, H]: f_t
    target_features: torch.Tensor  # [B, T, H]: f_{t+1} (0 where none)
    loss_mask: torch.Tensor  # [B, T] bool: l_{t+1} on positions that take part
    position_ids: torch.Tensor  # [B, T] int64: p_t
    document_ids: torch.Tensor  # [B, T] int64: d_t, or -1 where nothing follows in the document


def align_batch(
    input_ids: torch.Tensor,
    hidden_states: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
) -> AlignedBatch:
    """Shift a packed batch within its documents (see the module docstring).

    ``hidden_states`` is ``[B, T, 1, H]`` (the single post-norm state of the hidden-state spec)
    or ``[B, T, H]``.
    """
    features = hidden_states[:, :, -1] if hidden_states.dim() == 4 else hidden_states
    has_next = has_next_in_document(document_ids)  # [B, T]
    return AlignedBatch(
        input_ids=shift_left(input_ids, 1).masked_fill(~has_next, 0),
        features=features,
        target_features=shift_left(features, 1) * has_next[..., None],
        loss_mask=shift_left(loss_mask, 1).bool() & has_next,
        position_ids=position_ids,
        document_ids=document_ids.masked_fill(~has_next, -1),
    )


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: index ``t`` is the first index of its (real) document."""
    previous = torch.cat(
        [document_ids.new_full((document_ids.shape[0], 1), -1), document_ids[:, :-1]], 1
    )
    return (document_ids >= 0) & (previous != document_ids)


def document_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64: the length of each position's document (0 on padding)."""
    batch, length = document_ids.shape
    ids = document_ids.clamp(min=0)
    counts = torch.zeros(batch, length + 1, dtype=torch.long, device=document_ids.device)
    counts.scatter_add_(1, ids, (document_ids >= 0).long())
    return counts.gather(1, ids) * (document_ids >= 0)


def next_level_features(
    level: torch.Tensor, prediction: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """The features of the next level: ``prediction[t - 1]``, or ``level[t]`` at document starts.

    ``level`` and ``prediction`` are ``[B, T, H]`` (the current level's input and the step's
    output), ``starts`` is :func:`document_starts` of the aligned document ids.
    """
    shifted = torch.cat([level[:, :1], prediction[:, :-1]], dim=1)  # [B, T, H]
    return torch.where(starts[..., None], level, shifted)


def hass_attention_mask(document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """The dense boolean mask of HASS step ``step``: ``[B, 1, T, (step + 1) * T]``, True = attend.

    Keys are laid out level by level (level 0 first, as a KV cache grown step by step holds
    them). Query ``r`` of a real document sees level 0 at ``j <= r - step`` and level ``k >= 1``
    at ``j = r - step + k``, each only inside its document; a query outside any document
    (``document_ids == -1``: padding, or the last token of a document) sees only its own key of
    the newest level.
    """
    length = document_ids.shape[1]
    device = document_ids.device
    index = torch.arange(length, device=device)
    offset = index[None, :] - index[:, None]  # [T(q), T(kv)]: j - r
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T(q), T(kv)]
    real_query = (document_ids >= 0)[:, :, None]  # [B, T(q), 1]
    blocks = [(offset <= -step) & same_doc & real_query]
    for level in range(1, step + 1):
        blocks.append((offset == level - step) & same_doc & real_query)
    blocks[-1] = blocks[-1] | (offset == 0)  # every query sees itself (padding included)
    return torch.cat(blocks, dim=-1)[:, None]  # [B, 1, T, (step + 1) * T]
