"""The EAGLE-3 speculator config: ``speculators_model_type: "eagle3"`` (FORMAT.md 1.4).

Every field below is written to ``config.json`` explicitly (vLLM defaults a missing
``norm_before_residual`` to true and guesses aux layer ids when they are absent), next to the
core's ``speculators_config``. No field of this class holds training-only settings such as the
number of TTT steps: those live on the model (:meth:`Eagle3DraftModel.configure_training`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import InstanceOf
from transformers import PreTrainedConfig

from speculators_core import ConfigError, SpeculatorModelConfig
from speculators_core.modeling import coerce_layer_config, default_layer_config

__all__ = ["DRAFT_LAYER_TYPES", "Eagle3SpeculatorConfig", "PEagleSpeculatorConfig"]

#: Decoder-layer families a draft can use; vLLM maps them to its Eagle3 Llama/Qwen3 classes.
DRAFT_LAYER_TYPES: tuple[str, ...] = ("llama", "qwen3")


class Eagle3SpeculatorConfig(SpeculatorModelConfig):
    """Config of an EAGLE-3 draft.

    Fields (all written to ``config.json``):

    * ``transformer_layer_config`` - the draft decoder stack as a transformers config (Llama or
      Qwen3). ``vocab_size`` is the *verifier's* vocabulary (rows of ``embed_tokens``, length of
      ``t2d``), ``hidden_size`` the draft width ``H``, ``num_hidden_layers`` the number of draft
      layers (layer 0 is the special ``2H``-input layer). Serialized as a dict with its
      ``model_type``; a dict given here is turned into the config class it names.
    * ``draft_vocab_size`` - rows of ``lm_head`` (``Vd``) and length of ``d2t``. Equal to the
      verifier vocabulary means no ``d2t``/``t2d`` tensors are stored.
    * ``norm_before_residual`` - layer 0 adds the *normed* feature to the residual stream
      instead of the raw one.
    * ``target_hidden_size`` - verifier hidden size ``Ht`` when it differs from ``H``
      (``fc`` then takes ``num_aux * Ht`` inputs); null means ``Ht == H``.
    * ``eagle_aux_hidden_state_layer_ids`` - verifier layer ids (vLLM semantics: the residual
      stream entering layer ``k``) whose states are concatenated into ``fc``.
    * ``norm_before_fc`` - one RMSNorm over the concatenated aux states (``input_norm.weight``).
    * ``fc_norm`` - one RMSNorm per aux state before concatenation (``fc_norm.{i}.weight``);
      mutually exclusive with ``norm_before_fc``.
    * ``norm_output`` - feed the *post-norm* state back to the next draft step ("EAGLE 3.1").
    * ``embed_requires_grad`` - train the (verifier-copied) token embedding too.
    """

    speculators_model_type: str = "eagle3"
    # InstanceOf: pydantic must not introspect the transformers config (itself a dataclass).
    transformer_layer_config: InstanceOf[PreTrainedConfig] | dict[str, Any] = dataclasses.field(
        # FORMAT.md 1.4: upstream <= v0.4 falls back to LlamaConfig when no model_type is given.
        default_factory=default_layer_config
    )
    draft_vocab_size: int = 32000
    norm_before_residual: bool = False
    target_hidden_size: int | None = None
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    embed_requires_grad: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # FORMAT.md 1.4: no model_type means Llama for upstream <= v0.4 checkpoints.
        self.transformer_layer_config = coerce_layer_config(self.transformer_layer_config)
        super().__post_init__(**kwargs)
        self._check_consistency()

    def _check_consistency(self) -> None:
        layer_config = self.transformer_layer_config
        assert isinstance(layer_config, PreTrainedConfig)
        if layer_config.model_type not in DRAFT_LAYER_TYPES:
            raise ConfigError(
                f"config: transformer_layer_config.model_type is '{layer_config.model_type}'; "
                f"EAGLE-3 drafts use one of {', '.join(DRAFT_LAYER_TYPES)}"
            )
        if self.norm_before_fc and self.fc_norm:
            raise ConfigError(
                "config: norm_before_fc and fc_norm are both true; they are mutually exclusive, "
                "set one of them to false"
            )
        ids = self.eagle_aux_hidden_state_layer_ids
        if ids is not None and (not ids or len(set(ids)) != len(ids) or min(ids) < 0):
            raise ConfigError(
                f"config: eagle_aux_hidden_state_layer_ids {ids} must be distinct non-negative "
                "verifier layer ids; write the ids the draft was trained on"
            )
        if not 0 < self.draft_vocab_size <= layer_config.vocab_size:
            raise ConfigError(
                f"config: draft_vocab_size {self.draft_vocab_size} must be between 1 and "
                f"transformer_layer_config.vocab_size {layer_config.vocab_size}"
            )

    # ------------------------------------------------------------------ derived sizes

    @property
    def layer_config(self) -> PreTrainedConfig:
        """``transformer_layer_config`` as a transformers config (always one after init)."""
        assert isinstance(self.transformer_layer_config, PreTrainedConfig)
        return self.transformer_layer_config

    @property
    def verifier_vocab_size(self) -> int:
        """``V``: rows of ``embed_tokens`` and length of ``t2d``."""
        return int(self.layer_config.vocab_size)

    @property
    def aux_hidden_size(self) -> int:
        """``Ht``: width of one verifier hidden state."""
        return int(self.target_hidden_size or self.layer_config.hidden_size)

    @property
    def num_aux_states(self) -> int:
        """How many verifier states ``fc`` concatenates (3 when the ids are not recorded)."""
        ids = self.eagle_aux_hidden_state_layer_ids
        return len(ids) if ids else 3


class PEagleSpeculatorConfig(Eagle3SpeculatorConfig):
    """Config of a P-EAGLE draft (``speculators_model_type: "peagle"``; FORMAT-PARALLEL.md 2.1).

    An EAGLE-3 draft that proposes all ``k`` tokens in one forward: after the newest verified
    position it reads ``k - 1`` slots holding ``mask_token_id`` and the learned ``mask_hidden``
    feature. Fields beyond :class:`Eagle3SpeculatorConfig`'s:

    * ``mask_token_id`` - the token id of the mask slots. vLLM reads it (as ``pard_token``) and
      fails without it, so a draft always writes it.
    * ``embed_requires_grad`` - true by default: P-EAGLE trains the token embedding (the mask
      token's row above all).
    """

    speculators_model_type: str = "peagle"
    mask_token_id: int | None = None
    embed_requires_grad: bool = True

    def _check_consistency(self) -> None:
        super()._check_consistency()
        vocab = self.layer_config.vocab_size
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < vocab:
            raise ConfigError(
                f"config: mask_token_id {self.mask_token_id} is not a token id of the "
                f"{vocab}-token vocabulary; write the id the draft was trained with"
            )
