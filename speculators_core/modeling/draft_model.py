"""A base class for drafts trained on packed batches of verifier hidden states.

EAGLE-style drafts (EAGLE-1/2/HASS, EAGLE-3) share how a packed batch reaches their forward and
how they learn the verifier's depth; this class holds that, so each algorithm writes only its
``forward`` (the loss of one packed batch) and what is its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import ClassVar, cast

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as hf_init

from speculators_core.batch import BATCH_KEYS
from speculators_core.errors import SpeculatorsError
from speculators_core.model import SpeculatorModel, TrainingStepOutput
from speculators_core.modeling.verifier import (
    VerifierParts,
    load_verifier_config,
    load_verifier_parts,
)

__all__ = ["BATCH_KEYS", "HiddenStateDraftModel"]


class HiddenStateDraftModel(SpeculatorModel):
    """A :class:`~speculators_core.model.SpeculatorModel` whose ``forward`` takes a packed batch.

    Subclasses implement ``forward(input_ids, hidden_states, loss_mask, position_ids,
    document_ids) -> TrainingStepOutput``, list the modules holding verifier tensors in
    :meth:`verifier_owned_modules`, and in ``attach_verifier_parts`` read the verifier with
    :meth:`read_verifier` and set :attr:`verifier_parts_attached`.
    """

    @staticmethod
    def whole_sequence_inputs(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, T]`` and the causal mask ``[B, 1, T, T]`` of one draft step over
        whole sequences (what :meth:`draft_logits` runs on)."""
        batch, length = input_ids.shape
        positions = torch.arange(length).expand(batch, length)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return positions, causal[None, None].expand(batch, 1, -1, -1)

    #: The verifier's decoder-layer count (None until known: attached verifier or local folder).
    verifier_num_layers: int | None = None
    #: Whether the verifier's tensors the checkpoint lacks are in place.
    verifier_parts_attached: bool = False
    #: What the verifier's parts are, for the error that asks to attach them.
    verifier_parts_description: ClassVar[str] = "the frozen verifier parts"

    # ------------------------------------------------------------------ weights

    def verifier_owned_modules(self) -> tuple[nn.Module, ...]:
        """Modules whose weights come from the verifier (initialized to NaN until then)."""
        return ()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        layer_config = getattr(self.config, "layer_config", None)
        std = getattr(layer_config, "initializer_range", 0.02) or 0.02
        if module in self.verifier_owned_modules():
            # Copied from the verifier; NaN until then, so a part that was neither in the
            # checkpoint nor attached cannot pass silently.
            hf_init.constant_(cast(torch.Tensor, module.weight), math.nan)
        elif isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        else:
            super()._init_weights(module)  # norms (ones) and the rotary tables

    # ------------------------------------------------------------------ verifier parts

    def read_verifier(
        self, verifier: str | os.PathLike[str], *, vocab_size: int, hidden_size: int
    ) -> tuple[PreTrainedConfig, VerifierParts]:
        """The verifier's config and parts, refused unless its vocabulary and width match."""
        verifier_config = load_verifier_config(verifier)
        parts = load_verifier_parts(verifier)
        vocab, width = parts.embed_tokens.shape
        if (vocab, width) != (vocab_size, hidden_size):
            raise SpeculatorsError(
                f"verifier '{verifier}' has vocab {vocab} and hidden size {width}, but the draft "
                f"was built for vocab {vocab_size} and hidden size {hidden_size}; pass the "
                "verifier the draft was trained for"
            )
        return verifier_config, parts

    def _require_verifier_parts(self) -> None:
        if not self.verifier_parts_attached:
            raise SpeculatorsError(
                f"{self.verifier_parts_description} are not attached; call "
                "attach_verifier_parts(verifier_folder) or load with "
                "load_speculator(folder, verifier=verifier_folder)"
            )

    def training_step(self, batch: Mapping[str, torch.Tensor]) -> TrainingStepOutput:
        """Loss and metrics of one packed batch (see :mod:`speculators_core.batch`).

        Goes through ``self(...)`` (``forward``) so that wrappers hooking the module call (DDP,
        FSDP2's ``fully_shard``) see the whole step.
        """
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise SpeculatorsError(
                f"training batch lacks {', '.join(missing)}; pass a packed batch with the keys "
                f"{', '.join(BATCH_KEYS)}"
            )
        return cast(TrainingStepOutput, self(**{key: batch[key] for key in BATCH_KEYS}))

    def _num_verifier_layers(self) -> int:
        """The verifier's layer count: as attached, or read from the recorded local folder."""
        if self.verifier_num_layers is None:
            recorded = getattr(self.config.speculators_config, "verifier", None)
            path = getattr(recorded, "name_or_path", None)
            if path and os.path.isfile(os.path.join(path, "config.json")):
                self.verifier_num_layers = int(load_verifier_config(path).num_hidden_layers)
            else:
                raise SpeculatorsError(
                    f"the verifier's layer count is unknown (verifier '{path}' is not a local "
                    "folder); call attach_verifier_parts(verifier_folder) first"
                )
        return self.verifier_num_layers
