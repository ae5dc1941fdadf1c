"""The EAGLE-3 draft model, top to bottom: norms, MLP, attention, the two layer kinds, the model.

Notation: ``B`` rows, ``T`` positions, ``H`` draft hidden size, ``Ht`` verifier hidden size,
``n`` aux states, ``V`` verifier vocabulary, ``Vd`` draft vocabulary, ``S`` TTT steps.

One draft step (FORMAT.md 3.2), for position ``t`` with next token ``x_{t+1}``:

1. ``g_t = fc(aux_t)`` where ``aux_t`` (``[n*Ht]``) concatenates the verifier's aux states
   (optionally RMS-normed as a whole, ``norm_before_fc``, or per state, ``fc_norm``); later
   steps use the draft's own previous output instead of ``g_t``.
2. Layer 0 reads ``[input_layernorm(embed(x_{t+1})), hidden_norm(g_t)]`` (``2H`` wide) in
   attention; its residual stream starts from ``g_t`` (or the normed one with
   ``norm_before_residual``). Layers 1.. are ordinary decoder layers.
3. ``logits = lm_head(norm(h))`` over the draft vocabulary; ``d2t`` maps draft ids to verifier
   ids. The state fed to the next step is ``h`` (``norm(h)`` with ``norm_output``).

Tensor names are exactly those of the speculators format (FORMAT.md 1.4). ``verifier_norm`` and
``verifier_lm_head`` (frozen copies used only for training targets) are never saved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from speculators_core import (
    ConfigError,
    GreedyTokenProposalConfig,
    HiddenStateSpec,
    SpeculatorsConfig,
    SpeculatorsError,
    TrainingStepOutput,
    VerifierConfig,
    build_vocab_mapping,
    check_vocab_mapping,
)
from speculators_core.modeling import (
    DecoderLayer,
    HiddenStateDraftModel,
    KVCache,
    RMSNorm,
    draft_layer_fields,
    load_verifier_config,
    select_attention_implementation,
    shift_left,
)
from speculators_core.modeling.compact import compact_frozen
from speculators_core.objectives import (
    DEFAULT_OBJECTIVE,
    TargetDistribution,
    WeightedObjective,
    default_objective,
    resolve_objective,
)
from speculators_eagle3.alignment import align_batch
from speculators_eagle3.attention import TTTMask, ttt_block_mask
from speculators_eagle3.config import DRAFT_LAYER_TYPES, Eagle3SpeculatorConfig
from speculators_eagle3.loss import plan_ttt_loss, ttt_loss_rows, ttt_loss_states

if TYPE_CHECKING:
    from speculators_eagle3.drafting import Eagle3DraftSession

__all__ = [
    "DraftVocabularyMixin",
    "Eagle3DraftModel",
    "aux_state_spec",
    "default_aux_layer_ids",
    "resolve_vocab_mapping",
]

logger = logging.getLogger(__name__)


def default_aux_layer_ids(num_verifier_layers: int) -> list[int]:
    """The aux layer ids vLLM and upstream use by default: ``[2, N // 2, N - 3]``.

    The one copy of this rule: the converters plugin and the spec of a fresh draft call it.
    """
    n = num_verifier_layers
    return [2, n // 2, n - 3]


# ------------------------------------------------------------------------------------------------
# Layers (built on the core's DecoderLayer and RMSNorm, speculators_core.modeling.layers)
# ------------------------------------------------------------------------------------------------


class Eagle3FirstLayer(DecoderLayer):
    """Layer 0: attention over ``[normed embeddings, normed feature]`` (``2H`` inputs).

    ``input_layernorm`` norms the token embeddings, ``hidden_norm`` the feature; the residual
    stream starts from the feature (the normed one with ``norm_before_residual``).
    """

    hidden_norm: RMSNorm

    def __init__(self, config: Any, *, norm_before_residual: bool) -> None:
        super().__init__(
            config,
            0,
            qk_norm=config.model_type == "qwen3",
            attention_input_size=2 * config.hidden_size,
            hidden_norm=True,
        )
        self.norm_before_residual = norm_before_residual

    def forward(  # type: ignore[override]
        self,
        embeds: torch.Tensor,  # [B, T, H]
        feature: torch.Tensor,  # [B, T, H]
        rotary: tuple[torch.Tensor, torch.Tensor],
        *,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        normed_feature = self.hidden_norm(feature)
        residual = normed_feature if self.norm_before_residual else feature
        attn_in = torch.cat([self.input_layernorm(embeds), normed_feature], dim=-1)  # [B, T, 2H]
        return self.residual_block(
            residual, attn_in, rotary, cache=cache, mask=mask, implementation=implementation
        )  # [B, T, H]


class Eagle3DecoderLayer(DecoderLayer):
    """Layers 1..: a standard pre-norm decoder layer (Qwen3's q/k norms for Qwen3 layers)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx, qk_norm=config.model_type == "qwen3")


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def aux_state_spec(
    verifier: str | os.PathLike[str], aux_layer_ids: Sequence[int] | None
) -> HiddenStateSpec:
    """The states a fresh draft reading ``aux_layer_ids`` (default ``[2, N//2, N-3]``) and the
    verifier's final pre-norm state needs, from the verifier's config alone (EAGLE-3, P-EAGLE,
    DFlash)."""
    n_layers = int(load_verifier_config(verifier).num_hidden_layers)
    ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n_layers)
    spec = HiddenStateSpec(layer_ids=(*ids, n_layers))
    try:
        spec.validate(n_layers)
    except ValueError as err:
        raise SpeculatorsError(f"{err}; pass aux_layer_ids explicitly") from err
    return spec


class DraftVocabularyMixin:
    """A reduced draft vocabulary on a draft model: ``d2t`` offsets (``None`` for the verifier's
    full vocabulary), ``t2d`` derived from them, and ``save_pretrained`` re-deriving ``t2d``
    first. The model provides ``config.draft_vocab_size``, ``lm_head`` and the two buffers."""

    config: Any
    lm_head: nn.Linear
    d2t: torch.Tensor | None
    t2d: torch.Tensor | None

    def draft_to_target_ids(self) -> torch.Tensor:
        """Verifier ids of draft ids ``0..Vd-1``."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.lm_head.weight.device)
        return ids if self.d2t is None else ids + self.d2t

    def _draft_rows(self, full: torch.Tensor) -> torch.Tensor:
        """Rows of a ``[V, ...]`` verifier tensor that belong to the draft vocabulary."""
        if self.d2t is None:
            return full
        return full[self.draft_to_target_ids().to(full.device)]

    def _sync_t2d(self) -> None:
        # t2d is optional in files (vLLM skips it); it is always derivable from d2t.
        if self.d2t is None or self.t2d is None:
            return
        t2d = torch.zeros_like(self.t2d)
        t2d[self.draft_to_target_ids().to(t2d.device)] = True
        self.t2d.copy_(t2d)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write the speculators format (``t2d`` re-derived from ``d2t`` first)."""
        with torch.no_grad():
            self._sync_t2d()
        super().save_pretrained(save_directory, **kwargs)  # type: ignore[misc]


# ignore: the mixin's save_pretrained keeps the narrower signature the override always had
class Eagle3DraftModel(DraftVocabularyMixin, HiddenStateDraftModel):  # type: ignore[misc]
    """An EAGLE-3 draft (``speculators_model_type: "eagle3"``).

    Build one with :meth:`from_verifier`; load a saved one with
    ``load_speculator(folder, verifier=verifier_folder)`` (the verifier is only
    needed to train: it re-attaches the frozen target parts that are not saved).
    """

    config_class = Eagle3SpeculatorConfig
    config: Eagle3SpeculatorConfig
    #: ``speculators_config.algorithm`` of the drafts :meth:`from_verifier` builds.
    algorithm_name = "eagle3"
    #: Whether a config with sliding-window layers loads (run with full attention) instead of
    #: being refused.
    _runs_windows_in_full = False
    verifier_parts_description = "the frozen verifier parts (final norm, LM-head rows)"
    # transformers declares these on PreTrainedModel and reads them from the class.
    _keys_to_ignore_on_save = ["verifier_lm_head.weight", "verifier_norm.weight"]  # noqa: RUF012
    # Not in every file: verifier parts never are; converter output may omit the embedding
    # (vLLM then shares the verifier's) and t2d (vLLM ignores it).
    _keys_to_ignore_on_load_missing = [  # noqa: RUF012
        r"^verifier_lm_head\.weight$",
        r"^verifier_norm\.weight$",
        r"^embed_tokens\.weight$",
        r"^t2d$",
    ]
    # speculators v0.3 wrote identity d2t/t2d even for full-vocabulary drafts.
    _keys_to_ignore_on_load_unexpected = [r"^d2t$", r"^t2d$"]  # noqa: RUF012

    d2t: torch.Tensor | None
    t2d: torch.Tensor | None

    def __init__(self, config: Eagle3SpeculatorConfig) -> None:
        super().__init__(config)
        layer_config = config.layer_config
        hidden = layer_config.hidden_size
        aux_width = config.aux_hidden_size
        num_aux = config.num_aux_states
        eps = layer_config.rms_norm_eps
        vocab, draft_vocab = config.verifier_vocab_size, config.draft_vocab_size
        if layer_config.model_type not in DRAFT_LAYER_TYPES:  # pragma: no cover - config checks
            raise ConfigError(f"unsupported draft layer type '{layer_config.model_type}'")
        if getattr(layer_config, "use_sliding_window", False) and not self._runs_windows_in_full:
            raise ConfigError(
                "config: transformer_layer_config.use_sliding_window is true; sliding-window "
                "EAGLE-3 drafts are not supported, set it to false"
            )

        self.embed_tokens = nn.Embedding(vocab, hidden)  # [V, H], copied from the verifier
        self.input_norm = RMSNorm(num_aux * aux_width, eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(RMSNorm(aux_width, eps) for _ in range(num_aux))
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(num_aux * aux_width, hidden, bias=False)  # [n*Ht] -> [H]
        self.layers = nn.ModuleList(
            [Eagle3FirstLayer(layer_config, norm_before_residual=config.norm_before_residual)]
            + [
                Eagle3DecoderLayer(layer_config, i)
                for i in range(1, layer_config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)  # [H] -> [Vd]
        rotary_class = (
            Qwen3RotaryEmbedding if layer_config.model_type == "qwen3" else LlamaRotaryEmbedding
        )
        self.rotary_emb = rotary_class(cast(Any, layer_config))

        # Frozen verifier parts for the training targets (never saved).
        self.verifier_norm = RMSNorm(aux_width, eps)
        self.verifier_lm_head = nn.Linear(aux_width, draft_vocab, bias=False)  # [Ht] -> [Vd]

        if draft_vocab != vocab:
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool))
        else:
            self.d2t = None
            self.t2d = None

        # Training settings (not part of the saved format; see configure_training).
        self.ttt_steps = 3
        self.ttt_step_loss_decay = 1.0
        self.objective = default_objective()
        self.noise_std = 0.05
        self.attn_implementation = "auto"
        self.train_lm_head = False
        self.post_init()
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ weights

    def verifier_owned_modules(self) -> tuple[nn.Module, ...]:
        """Copied from the verifier: embedding, LM-head rows, and the frozen target parts."""
        return (self.embed_tokens, self.lm_head, self.verifier_lm_head, self.verifier_norm)

    def freeze_verifier_parts(self) -> None:
        """Set which parameters train: everything except the verifier-copied parts.

        The embedding trains only with ``embed_requires_grad``; ``lm_head`` (initialized to the
        verifier's rows) only with ``train_lm_head`` (upstream freezes it since v0.5).
        """
        self.embed_tokens.weight.requires_grad_(self.config.embed_requires_grad)
        self.lm_head.weight.requires_grad_(self.train_lm_head)
        self.verifier_norm.weight.requires_grad_(False)
        self.verifier_lm_head.weight.requires_grad_(False)

    def compact_frozen_parts(self) -> int:
        """The frozen embedding in bf16 when every value is a bf16 value (as when copied from a
        bf16 verifier): 1 GB less at Llama-3.1-8B's 128k x 4,096, the same numbers."""
        return compact_frozen(self.embed_tokens)

    def configure_training(
        self,
        *,
        ttt_steps: int | None = None,
        ttt_step_loss_decay: float | None = None,
        objective: str | WeightedObjective | None = None,
        noise_std: float | None = None,
        attn_implementation: str | None = None,
        train_lm_head: bool | None = None,
    ) -> None:
        """Change training-only settings (they are not saved with the checkpoint).

        ``objective`` is the per-position loss of every TTT step: a resolved
        :class:`~speculators_core.objectives.WeightedObjective` (what ``speculators train``
        passes, looked up in its plugin host) or a spec such as ``"kl=0.5,lk=0.5"`` of the
        core's objectives (resolve a plugin's with ``resolve_objective(spec, host)``).
        """
        if ttt_steps is not None:
            if ttt_steps < 1:
                raise SpeculatorsError(f"ttt_steps must be at least 1, got {ttt_steps}")
            self.ttt_steps = int(ttt_steps)
        if ttt_step_loss_decay is not None:
            if not 0 < ttt_step_loss_decay <= 1:
                raise SpeculatorsError(
                    f"ttt_step_loss_decay must be in (0, 1], got {ttt_step_loss_decay}"
                )
            self.ttt_step_loss_decay = float(ttt_step_loss_decay)
        if objective is not None:
            self.objective = resolve_objective(objective)
        if noise_std is not None:
            if noise_std < 0:
                raise SpeculatorsError(f"noise_std must be >= 0, got {noise_std}")
            self.noise_std = float(noise_std)
        if attn_implementation is not None:
            select_attention_implementation(attn_implementation, "cuda")  # name check only
            self.attn_implementation = attn_implementation
        if train_lm_head is not None:
            self.train_lm_head = bool(train_lm_head)
            self.freeze_verifier_parts()

    # ------------------------------------------------------------------ the forward pieces

    def combine_aux(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """``fc`` over the verifier aux states: ``[B, T, n*Ht] -> [B, T, H]``."""
        if self.input_norm is not None:
            aux_hidden_states = self.input_norm(aux_hidden_states)
        if self.fc_norm is not None:
            chunks = aux_hidden_states.chunk(len(self.fc_norm), dim=-1)  # n x [B, T, Ht]
            aux_hidden_states = torch.cat(
                [norm(chunk) for norm, chunk in zip(self.fc_norm, chunks, strict=True)], dim=-1
            )
        return self.fc(aux_hidden_states)

    def decode(
        self,
        input_ids: torch.Tensor,  # [B, T] verifier token ids
        feature: torch.Tensor,  # [B, T, H]: fc output or the previous step's state
        position_ids: torch.Tensor,  # [B, T]
        *,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        """The decoder stack for one draft step: returns the pre-norm output ``[B, T, H]``."""
        embeds = self.embed_tokens(input_ids).to(feature.dtype)  # [B, T, H] (compact_frozen_parts)
        rotary = self.rotary_emb(feature, position_ids)  # cos, sin: [B, T, head_dim]
        first, *rest = self.layers
        h = first(embeds, feature, rotary, cache=cache, mask=mask, implementation=implementation)
        for layer in rest:
            h = layer(h, rotary, cache=cache, mask=mask, implementation=implementation)
        return h

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits ``[.., Vd]`` and the state fed to the next step ``[.., H]``."""
        normed = self.norm(h)
        return self.lm_head(normed), (normed if self.config.norm_output else h)

    def draft_logits(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One draft step over whole sequences, over the verifier vocabulary (float64).

        ``features`` ``[B, T, n*Ht]`` are the aux states; tokens outside the draft vocabulary
        get ``-inf``.
        """
        positions, mask = self.whole_sequence_inputs(input_ids)  # [B, T], [B, 1, T, T]
        dtype = next(self.parameters()).dtype
        with torch.no_grad():
            feature = self.combine_aux(features.to(dtype))  # [B, T, H]
            h = self.decode(
                input_ids,
                feature,
                positions,
                cache=KVCache(len(self.layers)),
                mask=mask,
                implementation="eager",
            )
            logits, _ = self.head(h)  # [B, T, Vd]
        full = torch.full(
            (*input_ids.shape, self.config.verifier_vocab_size), float("-inf"), dtype=torch.float64
        )
        full[..., self.draft_to_target_ids()] = logits.double()
        return full

    def ttt_forward(
        self,
        aux_hidden_states: torch.Tensor,  # [B, T, n*Ht], aligned (g_t at index t)
        input_ids: torch.Tensor,  # [B, T], aligned (x_{t+1} at index t)
        document_ids: torch.Tensor,  # [B, T], aligned (-1 = takes no part)
        position_ids: torch.Tensor,  # [B, T], aligned
        *,
        steps: int | None = None,
        attn_implementation: str | None = None,
        logit_rows: Sequence[torch.Tensor] | None = None,
        project: bool = True,
    ) -> list[torch.Tensor]:
        """Draft logits ``[B, T, Vd]`` of each TTT step, with teacher forcing.

        Step ``s`` reads at index ``t`` the true token ``x_{t+1+s}`` and the state the previous
        step produced at the same index; its queries see the masks of
        :func:`~speculators_eagle3.attention.ttt_attention_mask`. With ``logit_rows`` (one
        tensor of flat indices ``b * T + t`` per step, as in
        :class:`~speculators_eagle3.loss.TTTLossPlan`), step ``s`` returns only the logits of
        those indices, ``[len(logit_rows[s]), Vd]``, and computes less: the LM head runs on
        those rows only, and (except with flex attention) steps ``1..`` run only at the
        positions some of them return. A position's later steps read nothing but its own
        earlier states and block 0, which step 0 computes whole. With ``logit_rows`` and
        ``project=False`` step ``s`` returns those rows' normed final states ``[N_s, H]``
        instead, for a loss that applies the LM head itself
        (:func:`~speculators_eagle3.loss.ttt_loss_states`).
        """
        steps = self.ttt_steps if steps is None else steps
        if logit_rows is not None and len(logit_rows) != steps:
            raise SpeculatorsError(
                f"logit_rows has {len(logit_rows)} entries for {steps} TTT steps; pass one "
                "index tensor per step"
            )
        implementation = select_attention_implementation(
            attn_implementation or self.attn_implementation, aux_hidden_states.device
        )
        feature = self.combine_aux(aux_hidden_states.to(self.fc.weight.dtype))  # [B, T, H]
        cache = KVCache(len(self.layers))
        # One mask object for every step: the dense masks share block 0, the split kernel
        # the document runs.
        masks = None if implementation == "flex" else TTTMask(document_ids)
        compact: _CompactSteps | None = None
        all_logits: list[torch.Tensor] = []
        for step in range(steps):
            step_ids, step_positions = shift_left(input_ids, step), position_ids + step
            if step == 1 and logit_rows is not None and masks is not None:
                # Steps 1.. run only at the positions some of them returns: a position's later
                # steps read its own earlier states and block 0 (step 0's keys), nothing else.
                compact = _CompactSteps.of(logit_rows[1:], *input_ids.shape)
                if compact.positions.shape[1] == 0:  # no later step returns anything
                    width = self.config.draft_vocab_size if project else feature.shape[-1]
                    empty = feature.new_zeros(0, width)
                    return all_logits + [empty] * (steps - 1)
                masks = masks.compacted(compact.positions)
                feature = compact.gather(feature)  # [B, M, H]
            if compact is not None:
                step_ids, step_positions = compact.gather(step_ids), compact.gather(step_positions)
            h = self.decode(
                step_ids,
                feature,
                step_positions,
                cache=cache,
                mask=ttt_block_mask(document_ids, step) if masks is None else masks,
                implementation=implementation,
            )
            if logit_rows is None:
                logits, feature = self.head(h)  # [B, T, Vd], [B, T, H]
            else:
                wanted = logit_rows[step] if compact is None else compact.index[logit_rows[step]]
                rows = self.norm(h.flatten(0, 1).index_select(0, wanted))  # [N_s, H]
                logits = self.lm_head(rows) if project else rows  # [N_s, Vd] or [N_s, H]
                feature = self.norm(h) if self.config.norm_output else h
            all_logits.append(logits)
        return all_logits

    @torch.no_grad()
    def verifier_logits(self, last_hidden_states: torch.Tensor) -> torch.Tensor:
        """Training targets: ``verifier_lm_head[t2d](verifier_norm(y))``, ``[B, T, Vd]``."""
        self._require_verifier_parts()
        return self.verifier_lm_head(self.verifier_norm(last_hidden_states))

    # ------------------------------------------------------------------ algorithm contract

    @classmethod
    def hidden_state_spec_for_verifier(
        cls, verifier: str | os.PathLike[str], **options: Any
    ) -> HiddenStateSpec:
        """The spec of a fresh draft for ``verifier``, from its config alone (no model is built).

        Only ``aux_layer_ids`` among the :meth:`from_verifier` options changes the spec.
        """
        return aux_state_spec(verifier, options.get("aux_layer_ids"))

    def hidden_state_spec(self) -> HiddenStateSpec:
        """The aux ids, then id ``N`` (the verifier's final pre-norm state, for the targets)."""
        ids = self.config.eagle_aux_hidden_state_layer_ids
        if not ids:
            raise ConfigError(
                "config: eagle_aux_hidden_state_layer_ids is not set; write the verifier layer ids "
                "the draft was trained on (default [2, N//2, N-3])"
            )
        return HiddenStateSpec(layer_ids=(*ids, self._num_verifier_layers()))

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] unshifted, as the verifier saw them
        hidden_states: torch.Tensor,  # [B, T, n_aux + 1, Ht] in hidden_state_spec() order
        loss_mask: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        document_ids: torch.Tensor,  # [B, T], -1 on padding
    ) -> TrainingStepOutput:
        """The training step: align, add noise (training mode), TTT forward, per-step loss."""
        aux, last, input_ids, position_ids, document_ids, loss_mask = self._training_inputs(
            input_ids, hidden_states, loss_mask, position_ids, document_ids
        )
        # Logits and targets only where the loss or the metrics read them (see TTTLossPlan).
        plan = plan_ttt_loss(document_ids, loss_mask, self.ttt_steps)
        self._require_verifier_parts()  # also when no row is scored
        target = TargetDistribution.from_head(  # [U, Vd], a chunk of rows at a time
            last.flatten(0, 1)[plan.target_rows],
            self.verifier_logits,
            self.config.draft_vocab_size,
        )
        decay, objective = self.ttt_step_loss_decay, self.objective
        if self.lm_head.weight.requires_grad:  # a trainable head: score its logits
            step_logits = self.ttt_forward(
                aux, input_ids, document_ids, position_ids, logit_rows=plan.rows
            )
            return ttt_loss_rows(
                plan, step_logits, target, step_loss_decay=decay, objective=objective
            )
        # A frozen head: no step's [N_s, Vd] logits are kept for the backward pass.
        states = self.ttt_forward(
            aux, input_ids, document_ids, position_ids, logit_rows=plan.rows, project=False
        )
        return ttt_loss_states(
            plan, states, self.lm_head.weight, target, step_loss_decay=decay, objective=objective
        )

    def _training_inputs(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor,
        document_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """A training batch aligned (index ``t``: token ``x_{t+1}``, aux states of ``t``, target
        state of ``t + 1``), noised in training mode and cut to its used length:
        ``(aux [B, T, n*Ht], last [B, T, Ht], input_ids, position_ids, document_ids,
        loss_mask)``."""
        expected = self.config.num_aux_states + 1
        if hidden_states.dim() != 4 or hidden_states.shape[2] != expected:
            raise SpeculatorsError(
                f"training batch hidden_states has shape {tuple(hidden_states.shape)}, expected "
                f"[B, T, {expected}, Ht] ({expected - 1} aux states + the final state, in "
                "hidden_state_spec() order)"
            )
        aligned = align_batch(input_ids, hidden_states, loss_mask, position_ids, document_ids)
        dtype = self.fc.weight.dtype
        aux = aligned.aux_hidden_states.to(dtype)  # [B, T, n*Ht]
        last = aligned.last_hidden_states.to(dtype)  # [B, T, Ht]
        if self.training and self.noise_std > 0:
            # Uniform noise in [-std, std] on the verifier states (upstream's AddUniformNoise).
            aux = aux + (torch.rand_like(aux) - 0.5) * (2 * self.noise_std)
            last = last + (torch.rand_like(last) - 0.5) * (2 * self.noise_std)
        input_ids, position_ids = aligned.input_ids, aligned.position_ids
        document_ids, loss_mask = aligned.document_ids, aligned.loss_mask
        if select_attention_implementation(self.attn_implementation, aux.device) != "flex":
            # The padding after the last document of every row takes no part: nothing attends
            # to it and it is never scored. Flex keeps the full length: its compiled kernel
            # would recompile for every new one.
            length = _used_length(document_ids)
            aux, last = aux[:, :length], last[:, :length]
            input_ids, position_ids = input_ids[:, :length], position_ids[:, :length]
            document_ids, loss_mask = document_ids[:, :length], loss_mask[:, :length]
        return aux, last, input_ids, position_ids, document_ids, loss_mask

    def draft_session(self, *, batch_size: int = 1) -> Eagle3DraftSession:
        """A :class:`~speculators_eagle3.drafting.Eagle3DraftSession` for the reference decoder."""
        from speculators_eagle3.drafting import Eagle3DraftSession

        return Eagle3DraftSession(self, batch_size=batch_size)

    # ------------------------------------------------------------------ verifier parts

    @torch.no_grad()
    def attach_verifier_parts(self, verifier: str | os.PathLike[str]) -> None:
        """Load the frozen verifier tensors the checkpoint does not hold.

        Always: ``verifier_norm`` and ``verifier_lm_head`` (the verifier's LM-head rows of the
        draft vocabulary). Also ``embed_tokens`` and ``lm_head`` when the checkpoint lacked them.
        """
        verifier_config, parts = self.read_verifier(
            verifier,
            vocab_size=self.config.verifier_vocab_size,
            hidden_size=self.config.aux_hidden_size,
        )
        width = self.config.aux_hidden_size
        self._sync_t2d()
        device = self.fc.weight.device
        dtype = self.fc.weight.dtype
        rows = self._draft_rows(parts.lm_head.to(device))
        self.verifier_lm_head.weight.copy_(rows.to(dtype))
        self.verifier_norm.weight.copy_(parts.final_norm.to(device=device, dtype=dtype))
        self.verifier_norm.eps = float(getattr(verifier_config, "rms_norm_eps", self.norm.eps))
        missing = [
            name
            for name, module in (("embed_tokens", self.embed_tokens), ("lm_head", self.lm_head))
            if torch.isnan(module.weight).any()
        ]
        if missing and width != self.config.layer_config.hidden_size:
            raise SpeculatorsError(
                f"the checkpoint lacks {', '.join(missing)} and the verifier's hidden size "
                f"{width} differs from the draft's {self.config.layer_config.hidden_size}; use a "
                "checkpoint that stores them"
            )
        if "embed_tokens" in missing:
            self.embed_tokens.weight.copy_(parts.embed_tokens.to(device=device, dtype=dtype))
        if "lm_head" in missing:
            self.lm_head.weight.copy_(rows.to(dtype))
        self.verifier_num_layers = int(verifier_config.num_hidden_layers)
        self.verifier_parts_attached = True
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        *,
        num_layers: int = 1,
        draft_vocab_size: int | None = None,
        token_counts: Mapping[int, int] | torch.Tensor | None = None,
        d2t: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        aux_layer_ids: list[int] | tuple[int, ...] | None = None,
        norm_before_residual: bool = True,
        norm_before_fc: bool = False,
        fc_norm: bool = False,
        norm_output: bool = False,
        layer_type: str = "llama",
        embed_requires_grad: bool = False,
        train_lm_head: bool = False,
        ttt_steps: int = 3,
        ttt_step_loss_decay: float = 1.0,
        objective: str | WeightedObjective = DEFAULT_OBJECTIVE,
        noise_std: float = 0.05,
        speculative_tokens: int | None = None,
        verifier_name_or_path: str | None = None,
        attn_implementation: str = "auto",
        init_from: str | os.PathLike[str] | None = None,
        _config_fields: Mapping[str, Any] | None = None,
        **unknown: Any,
    ) -> Eagle3DraftModel:
        """A fresh EAGLE-3 draft for the verifier in folder ``verifier``.

        The draft copies the verifier's sizes, RoPE settings and vocabulary; ``embed_tokens``,
        ``lm_head`` (and the frozen ``verifier_lm_head``) are the verifier's rows, ``fc`` and the
        decoder layers are freshly initialized.

        * ``num_layers``: draft decoder layers (layer 0 is the ``2H``-input layer).
        * ``draft_vocab_size``: ``None`` keeps the full verifier vocabulary (no ``d2t``/``t2d``);
          a smaller size needs ``token_counts`` (id -> count mapping or ``[V]`` tensor: the most
          frequent tokens are kept) or an explicit ``d2t``/``t2d`` pair.
        * ``aux_layer_ids``: verifier layer ids feeding ``fc`` (default ``[2, N//2, N-3]``,
          always written to the config).
        * ``norm_before_residual``/``norm_before_fc``/``fc_norm``/``norm_output``/
          ``embed_requires_grad``: the config fields of the same names.
        * ``layer_type``: ``"llama"`` or ``"qwen3"`` draft layers.
        * ``ttt_steps``, ``ttt_step_loss_decay``, ``objective``, ``noise_std``,
          ``attn_implementation``, ``train_lm_head``: training settings (see
          :meth:`configure_training`).
        * ``speculative_tokens``: what the greedy proposal records (vLLM's
          ``num_speculative_tokens``); default ``ttt_steps``.
        * ``verifier_name_or_path``: what to record as the verifier (a hub id or the path valid
          where vLLM will run); default the absolute path of ``verifier``.
        * ``init_from``: a saved ``eagle3`` folder (e.g. an earlier run's ``final/``) whose
          weights the draft starts from, for a curriculum (one data set, then another). Its
          architecture (layers, norms, aux layers, draft vocabulary) must be the one asked for
          here; the training settings are the new ones.
        """
        if unknown:
            raise SpeculatorsError(
                f"unknown eagle3 option(s) {', '.join(sorted(unknown))}; see "
                "Eagle3DraftModel.from_verifier for the options"
            )
        if layer_type not in DRAFT_LAYER_TYPES:
            raise SpeculatorsError(
                f"layer_type '{layer_type}' is not supported; use one of {', '.join(DRAFT_LAYER_TYPES)}"
            )
        if num_layers < 1:
            raise SpeculatorsError(f"num_layers must be at least 1, got {num_layers}")
        if ttt_steps < 1:
            raise SpeculatorsError(f"ttt_steps must be at least 1, got {ttt_steps}")
        if speculative_tokens is not None and speculative_tokens < 1:
            raise SpeculatorsError(
                f"speculative_tokens must be at least 1, got {speculative_tokens}"
            )
        vconfig = load_verifier_config(verifier)
        n_layers = int(vconfig.num_hidden_layers)
        vocab = int(vconfig.vocab_size)

        ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n_layers)
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) > n_layers:
            origin = "aux_layer_ids" if aux_layer_ids is not None else "the default aux layer ids"
            raise SpeculatorsError(
                f"{origin} {ids} must be distinct ids in 0..{n_layers} for a verifier with "
                f"{n_layers} layers; pass aux_layer_ids explicitly"
            )

        mapping = resolve_vocab_mapping(vocab, draft_vocab_size, token_counts, d2t, t2d)
        draft_vocab = vocab if mapping is None else int(mapping[0].shape[0])

        layer_fields = draft_layer_fields(vconfig, model_type=layer_type, num_layers=num_layers)
        tokens = ttt_steps if speculative_tokens is None else speculative_tokens
        config = cls.config_class(
            transformer_layer_config=layer_fields,
            draft_vocab_size=draft_vocab,
            norm_before_residual=norm_before_residual,
            target_hidden_size=None,
            eagle_aux_hidden_state_layer_ids=ids,
            norm_before_fc=norm_before_fc,
            fc_norm=fc_norm,
            norm_output=norm_output,
            embed_requires_grad=embed_requires_grad,
            **(_config_fields or {}),
            speculators_config=SpeculatorsConfig(
                algorithm=cls.algorithm_name,
                proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=tokens)],
                default_proposal_method="greedy",
                verifier=VerifierConfig.from_pretrained(
                    verifier, name_or_path=verifier_name_or_path
                ),
            ),
        )
        model = cls(config)
        model.train_lm_head = train_lm_head
        model.configure_training(
            ttt_steps=ttt_steps,
            ttt_step_loss_decay=ttt_step_loss_decay,
            objective=objective,
            noise_std=noise_std,
            attn_implementation=attn_implementation,
        )
        if mapping is not None and model.d2t is not None and model.t2d is not None:
            model.d2t.copy_(mapping[0])
            model.t2d.copy_(mapping[1])
        if init_from is not None:
            model._start_from(Path(init_from))
        model.attach_verifier_parts(verifier)
        return model

    #: Config fields that define the draft's weights: an ``init_from`` folder must match them.
    _ARCHITECTURE_FIELDS: tuple[str, ...] = (
        "draft_vocab_size",
        "norm_before_residual",
        "norm_before_fc",
        "fc_norm",
        "norm_output",
        "eagle_aux_hidden_state_layer_ids",
        "target_hidden_size",
    )

    def _start_from(self, path: Path) -> None:
        """Copy the weights of the saved eagle3 folder ``path`` into this fresh draft."""
        try:
            saved = type(self).from_pretrained(path)
        except (SpeculatorsError, OSError, ValueError) as err:
            raise SpeculatorsError(f"init_from '{path}' cannot be loaded: {err}") from err
        if not isinstance(saved, Eagle3DraftModel):
            raise SpeculatorsError(
                f"init_from '{path}' holds a {type(saved).__name__}, not an eagle3 draft; pass "
                "the final/ folder of an eagle3 run"
            )
        for name in self._ARCHITECTURE_FIELDS:
            theirs, ours = getattr(saved.config, name), getattr(self.config, name)
            if theirs != ours:
                raise SpeculatorsError(
                    f"init_from '{path}' has {name}={theirs} but {name}={ours} was asked for; "
                    "pass the same options (and --vocab) as the run that made it"
                )
        mine = {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith(("verifier_lm_head.", "verifier_norm."))
        }
        theirs_state = saved.state_dict()
        differing = [
            name
            for name, tensor in mine.items()
            if name not in theirs_state or theirs_state[name].shape != tensor.shape
        ]
        if differing:
            raise SpeculatorsError(
                f"init_from '{path}' has another architecture ({', '.join(differing[:4])} "
                "missing or of another shape); pass the same num_layers and layer_type as the run "
                "that made it"
            )
        if self.d2t is not None and not torch.equal(mine["d2t"], theirs_state["d2t"]):
            raise SpeculatorsError(
                f"init_from '{path}' has another draft vocabulary; pass the same --vocab as the "
                "run that made it"
            )
        with torch.no_grad():
            for name, tensor in mine.items():
                tensor.copy_(theirs_state[name].to(dtype=tensor.dtype))


@dataclass(frozen=True)
class _CompactSteps:
    """The positions TTT steps ``1..`` run at: per row, the ones listed, packed to the left."""

    positions: torch.Tensor  # [B, M] int64: the position t of each slot, -1 = padding
    slots: torch.Tensor  # [B, M] int64: positions with padding clamped to 0 (for gathers)
    index: torch.Tensor  # [B*T] int64: flat b*T+t -> flat b*M+slot (-1 where not listed)

    @classmethod
    def of(cls, rows: Sequence[torch.Tensor], batch: int, length: int) -> _CompactSteps:
        """The union of the flat indices ``b * T + t`` in ``rows``."""
        listed = torch.zeros(batch * length, dtype=torch.bool, device=rows[0].device)
        for index in rows:
            listed[index] = True
        flat = listed.nonzero().squeeze(1)  # ascending: row by row, position by position
        row, position = flat // length, flat % length
        counts = torch.bincount(row, minlength=batch)
        width = int(counts.max()) if flat.numel() else 0
        slot = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[row]
        positions = torch.full((batch, width), -1, dtype=torch.long, device=flat.device)
        positions[row, slot] = position
        index = torch.full((batch * length,), -1, dtype=torch.long, device=flat.device)
        index[flat] = row * width + slot
        return cls(positions, positions.clamp(min=0), index)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, ...]`` at the slots: ``[B, M, ...]``."""
        slots = self.slots.reshape(*self.slots.shape, *([1] * (x.dim() - 2)))
        return x.gather(1, slots.expand(-1, -1, *x.shape[2:]))


def _used_length(document_ids: torch.Tensor) -> int:
    """Indices ``0..L-1`` hold every position of ``document_ids`` (``[B, T]``) in a document.

    Past them a row holds only padding; at least 1, so that shapes stay non-empty.
    """
    in_document = (document_ids >= 0).any(dim=0).nonzero()
    return int(in_document[-1]) + 1 if in_document.numel() else 1


def resolve_vocab_mapping(
    vocab: int,
    draft_vocab_size: int | None,
    token_counts: Mapping[int, int] | torch.Tensor | None,
    d2t: torch.Tensor | None,
    t2d: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d2t, t2d)`` for a reduced draft vocabulary, or None for the full one."""
    if (d2t is None) != (t2d is None):
        raise SpeculatorsError(
            "pass d2t and t2d together (or neither); both come from build_vocab_mapping"
        )
    if d2t is not None and t2d is not None:
        try:
            check_vocab_mapping(d2t, t2d)
        except ValueError as err:
            raise SpeculatorsError(f"invalid d2t/t2d: {err}") from err
        if t2d.shape[0] != vocab:
            raise SpeculatorsError(
                f"t2d has {t2d.shape[0]} entries but the verifier vocab has {vocab}; build the "
                "mapping for this verifier"
            )
        if draft_vocab_size is not None and draft_vocab_size != d2t.shape[0]:
            raise SpeculatorsError(
                f"draft_vocab_size {draft_vocab_size} differs from len(d2t) {d2t.shape[0]}; "
                "drop one of them"
            )
        if d2t.shape[0] == vocab:
            return None
        return d2t.clone(), t2d.clone()
    if draft_vocab_size is None or draft_vocab_size == vocab:
        return None
    if not 0 < draft_vocab_size < vocab:
        raise SpeculatorsError(
            f"draft_vocab_size {draft_vocab_size} must be between 1 and the verifier vocab {vocab}"
        )
    if token_counts is None:
        raise SpeculatorsError(
            f"draft_vocab_size {draft_vocab_size} < verifier vocab {vocab} needs token_counts "
            "(or d2t/t2d) to choose the draft vocabulary"
        )
    try:
        return build_vocab_mapping(token_counts, draft_vocab_size, vocab)
    except ValueError as err:
        raise SpeculatorsError(f"cannot build the draft vocabulary: {err}") from err
