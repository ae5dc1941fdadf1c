"""The EAGLE-1/2 draft model trained the HASS way, top to bottom: norm, MLP, attention, layer, model.

Notation: ``B`` rows, ``T`` positions, ``H`` hidden size (the verifier's), ``V`` the verifier's
vocabulary, ``S`` HASS steps.

One draft step (FORMAT.md 3.1), for the pair of position ``t``: token ``x_{t+1}`` and feature
``f_t`` (the verifier's final **post-norm** hidden state, or the draft's own previous prediction):

1. ``e = embed_tokens(x_{t+1})`` (the verifier's embedding, frozen; ``embedding_layernorm(e)``
   with ``layernorms``);
2. ``g = fusion_fc(cat[e, f_t])`` (``2H -> H``, bias with ``fusion_bias``); with
   ``feature_norm_before_fc`` (the speculators research HASS forward)
   ``g = fusion_fc(cat[e, feature_layernorm(f_t)])``;
3. one Llama decoder layer whose ``input_layernorm`` is an identity (an RMSNorm with
   ``layernorms``, unless ``feature_norm_before_fc``): ``h = g + attn(g)``,
   ``h = h + mlp(post_attention_layernorm(h))``; no final norm. ``h`` is the predicted feature
   ``f^_{t+1}``, fed back (un-normed) as the next step's feature;
4. ``logits = lm_head(h)`` (the verifier's LM head, frozen; ``lm_head(pre_lm_head_layernorm(h))``
   with ``layernorms``).

Tensor names are those of the speculators ``eagle`` format (FORMAT.md 1.3): ``fusion_fc.*``,
``transformer.*``, and with ``layernorms`` ``embedding_layernorm.weight`` /
``pre_lm_head_layernorm.weight`` plus ``transformer.input_layernorm.weight``, or
``feature_layernorm.weight`` instead of it with ``feature_norm_before_fc``. ``embed_tokens`` and
``lm_head`` are the verifier's and are never saved;
:meth:`EagleDraftModel.attach_verifier_parts` puts them back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from speculators_core import (
    GreedyTokenProposalConfig,
    HiddenStateSpec,
    SpeculatorsConfig,
    SpeculatorsError,
    TrainingStepOutput,
    VerifierConfig,
)
from speculators_core.modeling import (
    DecoderLayer,
    HiddenStateDraftModel,
    KVCache,
    RMSNorm,
    draft_layer_fields,
    load_verifier_config,
)
from speculators_hass.alignment import (
    align_batch,
    document_lengths,
    document_starts,
    hass_attention_mask,
    next_level_features,
)
from speculators_hass.config import EagleSpeculatorConfig
from speculators_hass.loss import HassLossWeights, hass_loss

if TYPE_CHECKING:
    from speculators_hass.drafting import EagleDraftSession

__all__ = ["ATTENTION_IMPLEMENTATIONS", "EagleDraftModel"]

logger = logging.getLogger(__name__)

#: Attention kernels the draft runs with (dense boolean masks; HASS's masks are small).
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")

# HASS scales its uniform feature noise by 512 / (sample length) (FORMAT.md 3.5).
_NOISE_REFERENCE_LENGTH = 512


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class EagleDraftModel(HiddenStateDraftModel):
    """An EAGLE-1/2 draft (``speculators_model_type: "eagle"``) with HASS training.

    Build one with :meth:`from_verifier`; load a saved one with
    ``load_speculator(folder, verifier=verifier_folder)`` (the verifier puts back
    the shared embedding and LM head, which the format does not store).
    """

    config_class = EagleSpeculatorConfig
    config: EagleSpeculatorConfig
    verifier_parts_description = (
        "the verifier's embedding and LM head (an eagle checkpoint does not store them)"
    )
    # transformers declares these on PreTrainedModel and reads them from the class.
    _keys_to_ignore_on_save = ["embed_tokens.weight", "lm_head.weight"]  # noqa: RUF012
    _keys_to_ignore_on_load_missing = [r"^embed_tokens\.weight$", r"^lm_head\.weight$"]  # noqa: RUF012

    def __init__(self, config: EagleSpeculatorConfig) -> None:
        super().__init__(config)
        layer_config = config.layer_config
        hidden, eps = layer_config.hidden_size, layer_config.rms_norm_eps
        vocab = config.verifier_vocab_size

        self.embed_tokens = nn.Embedding(vocab, hidden)  # [V, H], the verifier's (frozen)
        self.embedding_layernorm = RMSNorm(hidden, eps) if config.layernorms else None
        # The research HASS forward normalizes the feature before the fusion, not after it.
        before_fc = config.feature_norm_before_fc
        self.feature_layernorm = RMSNorm(hidden, eps) if before_fc else None
        self.fusion_fc = nn.Linear(2 * hidden, hidden, bias=config.fusion_bias)  # [2H] -> [H]
        # Layer 0 without an input norm (an identity unless layernorms puts the middle norm
        # here): EAGLE-1's layer, and what vLLM's EagleLlamaForCausalLM builds.
        self.transformer = DecoderLayer(
            layer_config, input_layernorm=config.layernorms and not before_fc
        )
        self.pre_lm_head_layernorm = RMSNorm(hidden, eps) if config.layernorms else None
        self.lm_head = nn.Linear(hidden, vocab, bias=False)  # [H] -> [V], the verifier's (frozen)
        self.rotary_emb = LlamaRotaryEmbedding(cast(Any, layer_config))

        # Training settings (not part of the saved format; see configure_training).
        self.hass_steps = 3
        self.loss_weights = HassLossWeights()
        self.noise_std = 0.2
        self.attn_implementation = "sdpa"
        self.post_init()
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ weights

    def verifier_owned_modules(self) -> tuple[nn.Module, ...]:
        """The verifier's embedding and LM head (shared, never saved)."""
        return (self.embed_tokens, self.lm_head)

    def freeze_verifier_parts(self) -> None:
        """Freeze the shared verifier embedding and LM head (everything else trains)."""
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    def configure_training(
        self,
        *,
        hass_steps: int | None = None,
        v_w: float | None = None,
        p_w: float | None = None,
        topk_w: float | None = None,
        topk: int | None = None,
        noise_std: float | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        """Change training-only settings (they are not saved with the checkpoint).

        ``hass_steps`` is ``S`` (harmonized context alignment steps, 1 = plain EAGLE training);
        ``v_w``/``p_w``/``topk_w``/``topk`` the loss weights and ``K``
        (:class:`~speculators_hass.loss.HassLossWeights`); ``noise_std`` the HASS uniform noise
        on input features; ``attn_implementation`` ``"sdpa"`` or ``"eager"``.
        """
        if hass_steps is not None:
            if hass_steps < 1:
                raise SpeculatorsError(f"hass_steps must be at least 1, got {hass_steps}")
            self.hass_steps = int(hass_steps)
        current = self.loss_weights
        self.loss_weights = HassLossWeights(
            v_w=current.v_w if v_w is None else float(v_w),
            p_w=current.p_w if p_w is None else float(p_w),
            topk_w=current.topk_w if topk_w is None else float(topk_w),
            topk=current.topk if topk is None else int(topk),
        )
        if noise_std is not None:
            if noise_std < 0:
                raise SpeculatorsError(f"noise_std must be >= 0, got {noise_std}")
            self.noise_std = float(noise_std)
        if attn_implementation is not None:
            if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
                raise SpeculatorsError(
                    f"unknown attention implementation '{attn_implementation}'; use one of "
                    f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
                )
            self.attn_implementation = attn_implementation

    # ------------------------------------------------------------------ the forward pieces

    def decode(
        self,
        input_ids: torch.Tensor,  # [B, T] verifier token ids (x_{t+1})
        features: torch.Tensor,  # [B, T, H]: verifier features or the draft's own predictions
        position_ids: torch.Tensor,  # [B, T]
        *,
        cache: KVCache,
        mask: torch.Tensor | None,
        implementation: str,
    ) -> torch.Tensor:
        """One draft step: the predicted features ``[B, T, H]`` (pre-norm, fed back as they are)."""
        embeds = self.embed_tokens(input_ids)  # [B, T, H]
        if self.embedding_layernorm is not None:
            embeds = self.embedding_layernorm(embeds)
        features = features.to(embeds.dtype)
        if self.feature_layernorm is not None:
            # Every feature the fusion reads: the verifier's and the draft's fed-back predictions.
            features = self.feature_layernorm(features)
        fused = self.fusion_fc(torch.cat([embeds, features], dim=-1))  # [B, T, H]
        rotary = self.rotary_emb(fused, position_ids)  # cos, sin: [B, T, head_dim]
        return cast(
            torch.Tensor,
            self.transformer(fused, rotary, cache=cache, mask=mask, implementation=implementation),
        )

    def draft_logits(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One draft step over whole sequences: ``[B, T, V]`` logits (float64) of the features."""
        positions, mask = self.whole_sequence_inputs(input_ids)  # [B, T], [B, 1, T, T]
        dtype = next(self.parameters()).dtype
        with torch.no_grad():
            h = self.decode(
                input_ids,
                features.to(dtype),
                positions,
                cache=KVCache(1),
                mask=mask,
                implementation="eager",
            )
            return self.head(h).double()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[..., V]`` of predicted features (the verifier's LM head)."""
        if self.pre_lm_head_layernorm is not None:
            features = self.pre_lm_head_layernorm(features)
        return cast(torch.Tensor, self.lm_head(features))

    def target_head(self, features: torch.Tensor) -> torch.Tensor:
        """Verifier logits ``[..., V]`` of verifier features (its LM head, no extra norm)."""
        self._require_verifier_parts()
        return cast(torch.Tensor, self.lm_head(features))

    def hass_forward(
        self,
        features: torch.Tensor,  # [B, T, H], aligned (f_t at index t)
        input_ids: torch.Tensor,  # [B, T], aligned (x_{t+1} at index t)
        document_ids: torch.Tensor,  # [B, T], aligned (-1 = takes no part)
        position_ids: torch.Tensor,  # [B, T], aligned
        *,
        steps: int | None = None,
        attn_implementation: str | None = None,
    ) -> list[torch.Tensor]:
        """Predicted features ``[B, T, H]`` of each HASS step (harmonized context alignment).

        Step ``s`` reads the level-``s`` features (see :mod:`speculators_hass.alignment`) and
        attends, through the cache, to the keys of every level so far under
        :func:`~speculators_hass.alignment.hass_attention_mask`. Levels above 0 are built from
        detached predictions, as in HASS.
        """
        steps = self.hass_steps if steps is None else steps
        implementation = attn_implementation or self.attn_implementation
        starts = document_starts(document_ids)
        cache = KVCache(1)
        level = features.to(self.fusion_fc.weight.dtype)
        predictions = []
        for step in range(steps):
            mask = hass_attention_mask(document_ids, step)  # [B, 1, T, (step+1)*T]
            prediction = self.decode(
                input_ids,
                level,
                position_ids,
                cache=cache,
                mask=mask,
                implementation=implementation,
            )
            predictions.append(prediction)
            level = next_level_features(level, prediction.detach(), starts)
        return predictions

    # ------------------------------------------------------------------ algorithm contract

    @classmethod
    def hidden_state_spec_for_verifier(
        cls, verifier: str | os.PathLike[str], **options: Any
    ) -> HiddenStateSpec:
        """The spec for a verifier folder without building a draft: its final post-norm state.

        No :meth:`from_verifier` option changes it, so ``options`` are accepted and unused.
        """
        layers = int(load_verifier_config(verifier).num_hidden_layers)
        return HiddenStateSpec(layer_ids=(layers,), post_norm_last=True)

    def hidden_state_spec(self) -> HiddenStateSpec:
        """The verifier's final post-norm hidden state (id ``N`` with ``post_norm_last``)."""
        return HiddenStateSpec(layer_ids=(self._num_verifier_layers(),), post_norm_last=True)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] unshifted, as the verifier saw them
        hidden_states: torch.Tensor,  # [B, T, 1, H]: the final post-norm state
        loss_mask: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        document_ids: torch.Tensor,  # [B, T], -1 on padding
    ) -> TrainingStepOutput:
        """The training step: align, add noise (training mode), HASS forward, summed loss."""
        hidden = self.config.layer_config.hidden_size
        if (
            hidden_states.dim() != 4
            or hidden_states.shape[2] != 1
            or hidden_states.shape[3] != hidden
        ):
            raise SpeculatorsError(
                f"training batch hidden_states has shape {tuple(hidden_states.shape)}, expected "
                f"[B, T, 1, {hidden}] (the verifier's final post-norm state, hidden_state_spec())"
            )
        self._require_verifier_parts()
        aligned = align_batch(input_ids, hidden_states, loss_mask, position_ids, document_ids)
        dtype = self.fusion_fc.weight.dtype
        features = aligned.features.to(dtype)
        if self.training and self.noise_std > 0:
            # HASS's uniform noise on the input features only (targets stay clean), scaled by
            # 512 / length of the sample the position belongs to.
            scale = (
                self.noise_std
                * _NOISE_REFERENCE_LENGTH
                / document_lengths(document_ids).clamp(min=1)
            )
            noise = (torch.rand_like(features) - 0.5) * scale[..., None].to(dtype)
            features = features + noise * (document_ids >= 0)[..., None]
        predictions = self.hass_forward(
            features, aligned.input_ids, aligned.document_ids, aligned.position_ids
        )
        return hass_loss(
            predictions,
            aligned.target_features.to(dtype),
            aligned.loss_mask,
            head=self.head,
            target_head=self.target_head,
            weights=self.loss_weights,
        )

    def draft_session(self, *, batch_size: int = 1) -> EagleDraftSession:
        """An :class:`~speculators_hass.drafting.EagleDraftSession` for the reference decoder."""
        from speculators_hass.drafting import EagleDraftSession

        return EagleDraftSession(self, batch_size=batch_size)

    # ------------------------------------------------------------------ verifier parts

    @torch.no_grad()
    def attach_verifier_parts(self, verifier: str | os.PathLike[str]) -> None:
        """Load the verifier's embedding and LM head (frozen, shared, never saved)."""
        verifier_config, parts = self.read_verifier(
            verifier,
            vocab_size=self.config.verifier_vocab_size,
            hidden_size=self.config.layer_config.hidden_size,
        )
        device, dtype = self.fusion_fc.weight.device, self.fusion_fc.weight.dtype
        self.embed_tokens.weight.copy_(parts.embed_tokens.to(device=device, dtype=dtype))
        self.lm_head.weight.copy_(parts.lm_head.to(device=device, dtype=dtype))
        self.verifier_num_layers = int(verifier_config.num_hidden_layers)
        self.verifier_parts_attached = True
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        *,
        layernorms: bool = False,
        feature_norm_before_fc: bool = False,
        fusion_bias: bool = False,
        hass_steps: int = 3,
        v_w: float = 1.0,
        p_w: float = 0.1,
        topk_w: float = 1.0,
        topk: int = 10,
        noise_std: float = 0.2,
        attn_implementation: str = "sdpa",
        speculative_tokens: int | None = None,
        verifier_name_or_path: str | None = None,
        init_from: str | os.PathLike[str] | None = None,
        num_layers: int | None = None,
        draft_vocab_size: int | None = None,
        token_counts: Any = None,
        d2t: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        **unknown: Any,
    ) -> EagleDraftModel:
        """A fresh EAGLE-1/2 draft for the verifier in folder ``verifier``, trained the HASS way.

        The draft copies the verifier's sizes, RoPE settings and vocabulary; ``embed_tokens`` and
        ``lm_head`` are the verifier's (frozen), ``fusion_fc`` and the decoder layer are freshly
        initialized.

        * ``layernorms``/``feature_norm_before_fc``/``fusion_bias``: the config fields of the same
          names (``feature_norm_before_fc`` needs ``layernorms``; all three stop the draft from
          being exported to vLLM's native EAGLE layout).
        * ``hass_steps``, ``v_w``, ``p_w``, ``topk_w``, ``topk``, ``noise_std``,
          ``attn_implementation``: training settings (see :meth:`configure_training`). Stage 1
          of the published recipe uses ``topk_w=0``, stage 2 ``topk_w=1``
          (:mod:`speculators_hass.schedule`).
        * ``speculative_tokens``: what the greedy proposal records (vLLM's
          ``num_speculative_tokens``); default ``hass_steps``.
        * ``verifier_name_or_path``: what to record as the verifier (a hub id or the path valid
          where vLLM will run); default the absolute path of ``verifier``.
        * ``init_from``: an ``eagle`` folder (e.g. stage 1's ``final/``) whose weights and
          architecture the draft starts from; ``layernorms``/``feature_norm_before_fc``/
          ``fusion_bias`` must then match it.
        * ``num_layers`` (must be 1), ``draft_vocab_size`` (must be the verifier's vocabulary),
          ``token_counts``/``d2t``/``t2d`` (not accepted) exist so that generic callers (such as
          ``speculators train --num-layers/--draft-vocab-size/--vocab``) get a clear refusal:
          an EAGLE-1 draft has one layer and shares the verifier's full vocabulary.
        """
        if unknown:
            raise SpeculatorsError(
                f"unknown eagle option(s) {', '.join(sorted(unknown))}; see "
                "EagleDraftModel.from_verifier for the options"
            )
        if num_layers is not None and num_layers != 1:
            raise SpeculatorsError(
                f"num_layers={num_layers}: an eagle (EAGLE-1/HASS) draft has exactly one decoder "
                "layer; drop --num-layers or pass 1"
            )
        if token_counts is not None or d2t is not None or t2d is not None:
            raise SpeculatorsError(
                "an eagle (EAGLE-1/HASS) draft shares the verifier's LM head and always uses its "
                "full vocabulary; drop --vocab/--draft-vocab-size (token_counts, d2t, t2d)"
            )
        if feature_norm_before_fc and not layernorms:
            raise SpeculatorsError(
                "feature_norm_before_fc=true needs layernorms=true (the feature norm is one of "
                "its norms); pass layernorms=true too or drop feature_norm_before_fc"
            )
        if speculative_tokens is not None and speculative_tokens < 1:
            raise SpeculatorsError(
                f"speculative_tokens must be at least 1, got {speculative_tokens}"
            )
        vconfig = load_verifier_config(verifier)
        vocab = int(vconfig.vocab_size)
        if draft_vocab_size is not None and draft_vocab_size != vocab:
            raise SpeculatorsError(
                f"draft_vocab_size={draft_vocab_size}: an eagle (EAGLE-1/HASS) draft shares the "
                f"verifier's LM head, so its vocabulary is the verifier's ({vocab}); drop "
                "--draft-vocab-size"
            )
        tokens = hass_steps if speculative_tokens is None else speculative_tokens
        speculators_config = SpeculatorsConfig(
            algorithm="eagle",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=tokens)],
            default_proposal_method="greedy",
            verifier=VerifierConfig.from_pretrained(verifier, name_or_path=verifier_name_or_path),
        )
        if init_from is not None:
            model = cls._from_previous_stage(
                init_from,
                layernorms=layernorms,
                feature_norm_before_fc=feature_norm_before_fc,
                fusion_bias=fusion_bias,
            )
            model.config.speculators_config = speculators_config
        else:
            config = EagleSpeculatorConfig(
                transformer_layer_config=_layer_fields(vconfig),
                layernorms=layernorms,
                feature_norm_before_fc=feature_norm_before_fc,
                fusion_bias=fusion_bias,
                speculators_config=speculators_config,
            )
            model = cls(config)
        model.configure_training(
            hass_steps=hass_steps,
            v_w=v_w,
            p_w=p_w,
            topk_w=topk_w,
            topk=topk,
            noise_std=noise_std,
            attn_implementation=attn_implementation,
        )
        model.attach_verifier_parts(verifier)
        return model

    @classmethod
    def _from_previous_stage(
        cls,
        folder: str | os.PathLike[str],
        *,
        layernorms: bool,
        feature_norm_before_fc: bool,
        fusion_bias: bool,
    ) -> EagleDraftModel:
        path = Path(folder)
        try:
            model = cast(EagleDraftModel, cls.from_pretrained(path))
        except SpeculatorsError as err:
            raise SpeculatorsError(f"init_from '{path}' cannot be loaded: {err}") from err
        saved = model.config
        wanted_fields = (
            ("layernorms", layernorms),
            ("feature_norm_before_fc", feature_norm_before_fc),
            ("fusion_bias", fusion_bias),
        )
        for name, wanted in wanted_fields:
            if getattr(saved, name) != wanted:
                raise SpeculatorsError(
                    f"init_from '{path}' has {name}={str(getattr(saved, name)).lower()} but "
                    f"{name}={str(wanted).lower()} was asked for; pass the same value as the "
                    "first stage"
                )
        return model


def _layer_fields(vconfig: Any) -> dict[str, Any]:
    """The ``transformer_layer_config`` of a draft for a verifier config (FORMAT.md 1.3).

    One Llama layer of the verifier's sizes; the converter of upstream speculators also copies
    the special token ids, and so does this.
    """
    fields = draft_layer_fields(vconfig, model_type="llama", num_layers=1)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(vconfig, name, None)
        if value is not None:
            fields[name] = value
    return fields
