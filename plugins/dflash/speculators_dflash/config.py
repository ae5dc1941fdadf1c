"""The DFlash speculator config: ``speculators_model_type: "dflash"`` (FORMAT-PARALLEL.md 3.1).

Every field is written to ``config.json`` explicitly, next to the core's ``speculators_config``.
Training-only settings (anchors per row, loss weighting) live on the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import InstanceOf
from transformers import PreTrainedConfig, Qwen3Config

from speculators_core import ConfigError, SpeculatorModelConfig
from speculators_core.modeling import coerce_layer_config

__all__ = ["DFlashSpeculatorConfig"]


def _default_layer_config() -> PreTrainedConfig:
    return Qwen3Config(num_hidden_layers=1, tie_word_embeddings=False)


class DFlashSpeculatorConfig(SpeculatorModelConfig):
    """Config of a DFlash block drafter.

    * ``transformer_layer_config`` - the draft decoder (Qwen3-style: every DFlash layer has
      per-head q/k norms, whatever the ``model_type``); ``vocab_size`` is the verifier's.
    * ``draft_vocab_size`` - rows of ``lm_head`` (``Vd``); equal to the verifier vocabulary
      means no ``d2t``/``t2d`` and no ``lm_head`` in the file (vLLM shares the verifier's).
    * ``block_size`` - tokens per trained block ``B``: the anchor (the verifier's newest token)
      and ``B - 1`` mask slots, so ``k <= B - 1`` drafted tokens per forward were trained.
    * ``target_hidden_size`` - verifier width when it differs from the draft's.
    * ``aux_hidden_state_layer_ids`` - verifier layers (vLLM semantics) feeding ``fc``.
    * ``mask_token_id`` - the mask slots' token (vLLM reads it; required).
    * ``sliding_window_non_causal`` - vLLM runs the block bidirectionally when true, causally
      when false, for every layer. Full-attention layers train bidirectionally, so a draft
      without sliding-window layers writes true (FORMAT-PARALLEL.md 3.6 P1).
    * ``sample_from_anchor`` - must be false: vLLM's V1 proposer never samples the anchor slot.
    """

    speculators_model_type: str = "dflash"
    transformer_layer_config: InstanceOf[PreTrainedConfig] | dict[str, Any] = dataclasses.field(
        default_factory=_default_layer_config
    )
    draft_vocab_size: int = 32000
    block_size: int = 8
    target_hidden_size: int | None = None
    aux_hidden_state_layer_ids: list[int] | None = None
    mask_token_id: int | None = None
    sliding_window_non_causal: bool = False
    sample_from_anchor: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.transformer_layer_config = coerce_layer_config(
            self.transformer_layer_config, default_model_type="qwen3"
        )
        super().__post_init__(**kwargs)
        self._check_consistency()

    def _check_consistency(self) -> None:
        layer = self.layer_config
        vocab = int(layer.vocab_size)
        if self.block_size < 2:
            raise ConfigError(
                f"config: block_size {self.block_size} must be at least 2 (the anchor and one "
                "mask slot)"
            )
        if not 0 < self.draft_vocab_size <= vocab:
            raise ConfigError(
                f"config: draft_vocab_size {self.draft_vocab_size} must be between 1 and "
                f"transformer_layer_config.vocab_size {vocab}"
            )
        ids = self.aux_hidden_state_layer_ids
        if ids is not None and (not ids or len(set(ids)) != len(ids) or min(ids) < 0):
            raise ConfigError(
                f"config: aux_hidden_state_layer_ids {ids} must be distinct non-negative "
                "verifier layer ids; write the ids the draft was trained on"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < vocab:
            raise ConfigError(
                f"config: mask_token_id {self.mask_token_id} is not a token id of the "
                f"{vocab}-token vocabulary; write the id the draft was trained with"
            )
        if self.sample_from_anchor:
            raise ConfigError(
                "config: sample_from_anchor is true; vLLM's proposer never samples the anchor "
                "slot, so such a draft is not served as trained: use a false-anchor draft"
            )

    @property
    def layer_config(self) -> PreTrainedConfig:
        """``transformer_layer_config`` as a transformers config (always one after init)."""
        assert isinstance(self.transformer_layer_config, PreTrainedConfig)
        return self.transformer_layer_config

    @property
    def verifier_vocab_size(self) -> int:
        """``V``: rows of the (verifier's) embedding and length of ``t2d``."""
        return int(self.layer_config.vocab_size)

    @property
    def aux_hidden_size(self) -> int:
        """``Ht``: width of one verifier hidden state."""
        return int(self.target_hidden_size or self.layer_config.hidden_size)

    @property
    def num_aux_states(self) -> int:
        """How many verifier states ``fc`` concatenates (3 when the ids are not recorded)."""
        ids = self.aux_hidden_state_layer_ids
        return len(ids) if ids else 3

    @property
    def sliding_window(self) -> int | None:
        """The window of the draft's sliding-window layers, or None when it has none."""
        layer = self.layer_config
        types = getattr(layer, "layer_types", None) or []
        sliding = "sliding_attention" in types or getattr(layer, "use_sliding_window", False)
        window = getattr(layer, "sliding_window", None)
        return int(window) if sliding and window else None
