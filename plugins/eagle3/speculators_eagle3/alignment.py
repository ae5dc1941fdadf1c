"""Next-token alignment of a packed batch for EAGLE-3 training (FORMAT.md 3.3).

The core hands over rows exactly as the verifier saw them: token ``x_t``, its verifier states
``h_t`` (aux states ``g_t`` and the final state ``y_t``), loss mask ``l_t``, position ``p_t`` and
document ``d_t``. EAGLE-3 pairs the verifier feature of position ``t`` with the *next* token, so
after alignment index ``t`` of a row holds:

* token ``x_{t+1}`` and aux feature ``g_t`` (what the draft reads),
* final state ``y_{t+1}`` (its target: the verifier's distribution for ``x_{t+2}``),
* weight ``l_{t+1}`` (the mask of the token the draft reads, as upstream does),
* position ``p_t + 1`` (the position of ``x_{t+1}``),
* document ``d_t``, or -1 when ``t`` is the last token of its document (nothing follows it
  there) or padding.

Rows keep their length ``T``; the last index of each document becomes an inert position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculators_core.modeling.alignment import has_next_in_document, shift_left

__all__ = ["AlignedBatch", "align_batch"]


@dataclass
class AlignedBatch:
    """A packed batch after the within-document next-token shift (shapes ``[B, T, ...]``)."""

    input_ids: torch.Tensor  # [B, T] int64: x_{t+1}
    aux_hidden_states: torch.Tensor  # [B, T, num_aux * Ht]: g_t, concatenated in id order
    last_hidden_states: torch.Tensor  # [B, T, Ht]: y_{t+1}
    loss_mask: torch.Tensor  # [B, T] bool: l_{t+1} on valid positions
    position_ids: torch.Tensor  # [B, T] int64: p_t + 1
    document_ids: torch.Tensor  # [B, T] int64: d_t, or -1 where nothing follows in the document


def align_batch(
    input_ids: torch.Tensor,
    hidden_states: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
) -> AlignedBatch:
    """Shift a packed batch within its documents (see the module docstring).

    ``hidden_states`` is ``[B, T, n, Ht]`` in hidden-state-spec order: the ``n - 1`` aux states
    followed by the final pre-norm state.
    """
    batch, _length, num_states, width = hidden_states.shape
    has_next = has_next_in_document(document_ids)  # [B, T]
    next_ids = shift_left(input_ids, 1).masked_fill(~has_next, 0)
    aux = hidden_states[:, :, :-1].reshape(batch, -1, (num_states - 1) * width)
    last = shift_left(hidden_states[:, :, -1], 1)
    next_mask = shift_left(loss_mask, 1).bool() & has_next
    return AlignedBatch(
        input_ids=next_ids,
        aux_hidden_states=aux,
        last_hidden_states=last,
        loss_mask=next_mask,
        position_ids=position_ids + 1,
        document_ids=document_ids.masked_fill(~has_next, -1),
    )
