"""Drafting with an EAGLE-3 draft: the session the reference speculative decoder drives.

The chain-drafting machinery (KV cache over draft indices, ``extend``/``propose``) is the core's
:class:`~speculators_core.modeling.ChainDraftSession`. An EAGLE-3 draft pairs the aux states of
position ``t`` with token ``x_{t+1}`` (exactly as in training), at RoPE position ``t + 1``; its
input feature is ``fc`` over the aux states, its head the draft norm and LM head over the draft
vocabulary, whose ids ``d2t`` maps to the verifier's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from speculators_core import SpeculatorsError
from speculators_core.modeling import ChainDraftSession

if TYPE_CHECKING:
    from speculators_eagle3.model import Eagle3DraftModel

__all__ = ["Eagle3DraftSession"]


class Eagle3DraftSession(ChainDraftSession):
    """Per-generation drafting state of an :class:`~speculators_eagle3.model.Eagle3DraftModel`."""

    model: Eagle3DraftModel

    def __init__(self, model: Eagle3DraftModel, *, batch_size: int = 1) -> None:
        super().__init__(
            model,
            batch_size=batch_size,
            num_layers=len(model.layers),
            device=model.fc.weight.device,
            # Drafting attends over few queries; flex's block masks buy nothing here.
            implementation="eager" if model.attn_implementation == "eager" else "sdpa",
            position_offset=1,
        )

    @property
    def num_aux_states(self) -> int:
        """How many aux states ``fc`` reads (``extend`` may also carry the final state after them)."""
        return self.model.config.num_aux_states

    def check_hidden_states(self, hidden_states: torch.Tensor, new_states: int) -> None:
        """``[B, m', n, Ht]`` with ``n`` the aux states, or those plus the final state of the
        hidden-state spec (which drafting does not use)."""
        n_aux = self.num_aux_states
        if (
            hidden_states.dim() != 4
            or hidden_states.shape[0] != self.batch_size
            or hidden_states.shape[1] != new_states
            or hidden_states.shape[2] not in (n_aux, n_aux + 1)
        ):
            raise SpeculatorsError(
                f"extend() hidden_states must be [{self.batch_size}, {new_states}, {n_aux} or "
                f"{n_aux + 1}, Ht] for {new_states} new states, got "
                f"{tuple(hidden_states.shape)}"
            )

    def input_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``fc`` over the aux states: ``[B, m', n, Ht] -> [B, m', H]``."""
        model = self.model
        aux = hidden_states[:, :, : self.num_aux_states]
        aux = aux.to(device=self.device, dtype=model.fc.weight.dtype)
        return model.combine_aux(aux.flatten(2))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits ``[B, Vd]`` and the state fed to the next step."""
        return self.model.head(h)

    def draft_vocabulary(self) -> tuple[torch.Tensor, int]:
        """Verifier ids of the draft ids (``d2t``) and the verifier's vocabulary size."""
        return self.model.draft_to_target_ids(), self.model.config.verifier_vocab_size
