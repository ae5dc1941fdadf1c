"""Shifts within the documents of a packed batch, shared by next-token-aligned drafts.

A packed row holds several documents one after another (``document_ids``, -1 on padding).
EAGLE-style drafts pair the verifier feature of position ``t`` with the *next* token, so the
last position of each document has no partner: :func:`has_next_in_document` says which
positions have one, :func:`shift_left` moves a tensor one (or more) positions to the left.
"""

from __future__ import annotations

import torch

__all__ = ["has_next_in_document", "shift_left"]


def shift_left(tensor: torch.Tensor, steps: int, fill: float | int = 0) -> torch.Tensor:
    """``out[:, t] = tensor[:, t + steps]`` along dim 1, with ``fill`` past the end."""
    if steps == 0:
        return tensor
    tail = tensor.new_full((tensor.shape[0], steps, *tensor.shape[2:]), fill)
    return torch.cat([tensor[:, steps:], tail], dim=1)


def has_next_in_document(document_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: ``x_{t+1}`` exists and belongs to the same (real) document as ``x_t``."""
    has_next = (document_ids[:, :-1] == document_ids[:, 1:]) & (document_ids[:, :-1] >= 0)
    return torch.cat([has_next, has_next.new_zeros(document_ids.shape[0], 1)], dim=1)
