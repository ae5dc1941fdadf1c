"""The drafting contract between an algorithm and the reference speculative decoder.

The decoder runs the verifier; the draft proposes. Position ``t`` of a sequence has token
``x_t`` and, once the verifier has processed it, hidden states ``h_t`` (the algorithm's
:class:`~speculators_core.features.HiddenStateSpec`). EAGLE-style drafts pair ``h_t`` with the
*next* token ``x_{t+1}``, so a session always holds one more token than it has states for: the
newest token (the one the verifier just emitted) still awaits its states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["DraftProposal", "DraftSession"]


@dataclass
class DraftProposal:
    """``k`` drafted tokens per sequence and the distributions they were drawn from.

    ``tokens`` is ``[B, k]`` int64 in the verifier's vocabulary; ``logits`` is ``[B, k, V]``
    over the verifier's vocabulary (tokens outside a reduced draft vocabulary get ``-inf``).
    """

    tokens: torch.Tensor
    logits: torch.Tensor


@runtime_checkable
class DraftSession(Protocol):
    """Per-generation drafting state (the draft's KV cache over verified context).

    Usage by the decoder, per round::

        session.extend(token_ids, hidden_states)  # newly verified tokens and their states
        proposal = session.propose(k, temperature=0.0)

    ``extend`` receives tokens ``[B, m]`` and the verifier states ``[B, m', n, Ht]`` of the
    positions that now have them, where the first call has ``m' = m - 1`` (the newest token has
    no states yet) and later calls ``m' = m`` (states for the previously pending token and all
    but the newest of the new tokens). Drafted positions beyond the verified context are
    discarded by the next ``extend``.
    """

    def extend(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Append verified tokens and the verifier states that became available."""
        ...

    def propose(
        self, k: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> DraftProposal:
        """Draft ``k`` tokens after the verified context (argmax when ``temperature`` is 0)."""
        ...
