"""Drafting with an EAGLE-1/2 (HASS) draft: the session the reference speculative decoder drives.

The chain-drafting machinery (KV cache over draft indices, ``extend``/``propose``) is the core's
:class:`~speculators_core.modeling.ChainDraftSession`. An EAGLE-1 draft pairs the verifier's
final post-norm feature ``f_t`` with token ``x_{t+1}`` at RoPE position ``t`` (as in training
and in vLLM); its input feature is ``f_t`` itself, its output the predicted feature
``f^_{t+1}``, which is fed back as the next step's feature, and its logits are the verifier's LM
head over that prediction (the full verifier vocabulary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from speculators_core import SpeculatorsError
from speculators_core.modeling import ChainDraftSession

if TYPE_CHECKING:
    from speculators_hass.model import EagleDraftModel

__all__ = ["EagleDraftSession"]


class EagleDraftSession(ChainDraftSession):
    """Per-generation drafting state of an :class:`~speculators_hass.model.EagleDraftModel`."""

    model: EagleDraftModel

    def __init__(self, model: EagleDraftModel, *, batch_size: int = 1) -> None:
        model._require_verifier_parts()
        super().__init__(
            model,
            batch_size=batch_size,
            num_layers=1,
            device=model.fusion_fc.weight.device,
            implementation=model.attn_implementation,
            position_offset=0,
        )

    def check_hidden_states(self, hidden_states: torch.Tensor, new_states: int) -> None:
        """``[B, m', 1, H]``: the verifier's final post-norm feature of each new position."""
        hidden = self.model.config.layer_config.hidden_size
        if (
            hidden_states.dim() != 4
            or hidden_states.shape[0] != self.batch_size
            or hidden_states.shape[1] != new_states
            or hidden_states.shape[2] != 1
            or hidden_states.shape[3] != hidden
        ):
            raise SpeculatorsError(
                f"extend() hidden_states must be [{self.batch_size}, {new_states}, 1, {hidden}] "
                f"(the final post-norm feature of each new position), got "
                f"{tuple(hidden_states.shape)}"
            )

    def input_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The features themselves: ``[B, m', 1, H] -> [B, m', H]``."""
        return hidden_states[:, :, 0].to(
            device=self.device, dtype=self.model.fusion_fc.weight.dtype
        )

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the predicted feature (verifier LM head) and the feature itself, fed back."""
        return self.model.head(h), h
