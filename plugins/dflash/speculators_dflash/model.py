"""The DFlash block drafter (FORMAT-PARALLEL.md 3): one forward drafts a block of tokens.

Notation: ``T`` verified positions, ``H`` draft width, ``Ht`` verifier width, ``n`` aux states,
``B`` block size, ``V``/``Vd`` verifier/draft vocabulary.

* **Context.** Every verified position ``t`` becomes ``c_t = hidden_norm(fc(aux_t))``; each draft
  layer turns it into keys and values with its own ``k_proj``/``k_norm``/``v_proj`` (RoPE at
  ``t``), without the layer's input norm. Context states never go through the layers.
* **Block.** After the newest verified position ``p``, the block holds the verifier's newest
  token ``x_{p+1}`` (the anchor) and ``B - 1`` copies of ``mask_token_id`` at positions
  ``p + 1 .. p + B``. It runs through the layers as an ordinary pre-norm decoder whose
  attention sees the context keys (positions ``<= p``, within the window of sliding-window
  layers) and the block's own keys: all of them (full-attention layers, or
  ``sliding_window_non_causal``), or the earlier ones (sliding-window layers otherwise).
* **Output.** ``lm_head(norm(h))`` at mask slot ``i`` is the ``i``-th drafted token; the anchor
  slot is not sampled.

Training (upstream 0.9.0's objective, FORMAT-PARALLEL.md 3.4) runs that on unshifted packed rows:
up to ``max_anchors`` random supervised anchors per row, each a block whose context is its
document before the anchor; slot ``i`` of anchor ``a`` is scored against the verifier's
distribution at ``a + i - 1`` (which predicts ``x_{a+i}``) where ``x_{a+i}`` is supervised and in
the anchor's document (upstream does not check the document). The per-slot objective (``ce``
on the verifier's token by default) is weighted per slot (D-PACE by default, see
:func:`position_weights`) and summed over scored slots, divided by their count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, cast

import torch
from speculators_eagle3.model import (
    DraftVocabularyMixin,
    aux_state_spec,
    default_aux_layer_ids,
    resolve_vocab_mapping,
)
from speculators_eagle3.peagle import resolve_mask_token_id
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from speculators_core import (
    GreedyTokenProposalConfig,
    HiddenStateSpec,
    SpeculatorsConfig,
    SpeculatorsError,
    TrainingStepOutput,
    VerifierConfig,
)
from speculators_core.drafting import DraftProposal
from speculators_core.modeling import (
    DecoderLayer,
    HiddenStateDraftModel,
    KVCache,
    RMSNorm,
    apply_rotary,
    draft_layer_fields,
    load_verifier_config,
)
from speculators_core.modeling.compact import compact_frozen
from speculators_core.objectives import (
    TargetDistribution,
    WeightedObjective,
    resolve_objective,
)
from speculators_dflash.config import DFlashSpeculatorConfig

__all__ = [
    "POSITION_WEIGHTS",
    "DFlashDraftModel",
    "DFlashDraftSession",
    "DFlashLayer",
    "block_attention_mask",
    "position_weights",
]

logger = logging.getLogger(__name__)

#: Per-slot loss weightings: D-PACE (upstream's DFlash default), exponential decay, none.
POSITION_WEIGHTS = ("dpace", "exp", "uniform")


class DFlashLayer(DecoderLayer):
    """A Qwen3-style decoder layer (per-head q/k norms) that also turns context states into
    keys and values (:meth:`write_context`)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx, qk_norm=True)

    def write_context(
        self, context: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> None:
        """Append the keys/values of context states ``[B, T, H]`` to this layer's cache."""
        attn = self.self_attn
        batch, length, _ = context.shape
        key = attn.k_proj(context).view(batch, length, attn.num_kv_heads, attn.head_dim)
        assert attn.k_norm is not None  # qk_norm=True
        key = apply_rotary(attn.k_norm(key).transpose(1, 2), *rotary)
        value = attn.v_proj(context).view(batch, length, attn.num_kv_heads, attn.head_dim)
        cache.update(self.layer_idx, key, value.transpose(1, 2))


def block_attention_mask(
    document_ids: torch.Tensor,  # [T] of the row (-1: takes no part)
    anchors: torch.Tensor,  # [A]
    block_size: int,
    *,
    causal_block: bool,
    window: int | None,
) -> torch.Tensor:
    """``[A*B, T + A*B]`` boolean mask, True = the block query sees the key.

    Block ``j`` (anchor ``a``) sees context keys ``t < a`` of its document (and ``t >= a - W``
    with a window ``W``) and the keys of its own block: all of them, or with ``causal_block``
    those at or before the query.
    """
    length = document_ids.shape[0]
    count = anchors.shape[0]
    slots = count * block_size
    anchor_of = anchors.repeat_interleave(block_size)  # [Q]
    t = torch.arange(length, device=document_ids.device)
    doc = document_ids[anchor_of]  # [Q]
    context = (document_ids[None, :] == doc[:, None]) & (doc[:, None] >= 0)
    context &= t[None, :] < anchor_of[:, None]
    if window is not None:
        context &= t[None, :] >= anchor_of[:, None] - window
    q = torch.arange(slots, device=document_ids.device)
    own = (q[:, None] // block_size) == (q[None, :] // block_size)
    if causal_block:
        own &= q[None, :] <= q[:, None]
    return torch.cat([context, own], dim=1)


def position_weights(
    kind: str,
    scored: torch.Tensor,  # [A, B] bool: slot scored (slot 0 never is)
    confidence: torch.Tensor,  # [A, B]: the draft's probability of the verifier's token
    *,
    alpha: float = 0.5,
    gamma: float = 4.0,
) -> torch.Tensor:
    """Per-slot loss weights ``[A, B]`` (no gradient).

    * ``dpace``: ``s_i = (1 - alpha) q_i + alpha`` on scored slots (1 elsewhere),
      ``P_i = prod_{j <= i} s_j``, ``w_i = m_i sum_{k >= i} P_k m_k``: a slot weighs as much as
      the expected acceptance of everything it opens the way to.
    * ``exp``: ``w_i = exp(-(i - 1) / gamma)`` for slots ``i >= 1``.
    * ``uniform``: 1.
    """
    mask = scored.float()
    if kind == "uniform":
        return mask
    if kind == "exp":
        slot = torch.arange(scored.shape[1], device=scored.device, dtype=torch.float32)
        return mask * torch.exp(-(slot - 1).clamp(min=0) / gamma)
    if kind != "dpace":
        raise SpeculatorsError(
            f"position_weight '{kind}' is not one of {', '.join(POSITION_WEIGHTS)}"
        )
    with torch.no_grad():
        smooth = torch.where(scored, (1 - alpha) * confidence.float() + alpha, 1.0)
        prefix = torch.cumprod(smooth, dim=1)
        suffix = (prefix * mask).flip(1).cumsum(1).flip(1)
        return suffix * mask


# ignore: the mixin's save_pretrained keeps the narrower signature the override always had
class DFlashDraftModel(DraftVocabularyMixin, HiddenStateDraftModel):  # type: ignore[misc]
    """A DFlash block drafter (see the module doc).

    Build one with :meth:`from_verifier`; ``save_pretrained`` writes the speculators ``dflash``
    format vLLM 0.32 serves with ``method: dflash``: no ``embed_tokens`` (vLLM shares the
    verifier's) and, for the full vocabulary, no ``lm_head`` either.
    """

    config_class = DFlashSpeculatorConfig
    config: DFlashSpeculatorConfig
    verifier_parts_description = "the verifier's embedding, final norm and LM-head rows"
    _keys_to_ignore_on_load_missing = [  # noqa: RUF012
        r"^embed_tokens\.weight$",
        r"^lm_head\.weight$",
        r"^verifier_lm_head\.weight$",
        r"^verifier_norm\.weight$",
        r"^t2d$",
    ]
    _keys_to_ignore_on_load_unexpected = [r"^d2t$", r"^t2d$"]  # noqa: RUF012

    d2t: torch.Tensor | None
    t2d: torch.Tensor | None

    def __init__(self, config: DFlashSpeculatorConfig) -> None:
        super().__init__(config)
        layer = config.layer_config
        hidden, eps = int(layer.hidden_size), float(layer.rms_norm_eps)
        vocab, draft_vocab = config.verifier_vocab_size, config.draft_vocab_size
        types = list(getattr(layer, "layer_types", None) or [])
        if types and len(set(types)) > 1:
            raise SpeculatorsError(
                "config: the draft mixes sliding-window and full-attention layers, which vLLM's "
                "V1 runner (the CPU one) refuses; use one kind for every layer"
            )
        self.embed_tokens = nn.Embedding(vocab, hidden)  # the verifier's, never saved
        self.fc = nn.Linear(config.num_aux_states * config.aux_hidden_size, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.layers = nn.ModuleList(
            DFlashLayer(layer, i) for i in range(int(layer.num_hidden_layers))
        )
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.rotary_emb = Qwen3RotaryEmbedding(cast(Any, layer))
        self.verifier_norm = RMSNorm(config.aux_hidden_size, eps)
        self.verifier_lm_head = nn.Linear(config.aux_hidden_size, draft_vocab, bias=False)
        if draft_vocab != vocab:
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool))
        else:
            self.d2t = None
            self.t2d = None
        # What the file holds: never the verifier's parts or embedding; lm_head only for a
        # reduced vocabulary (a full one is the verifier's head, which vLLM shares).
        ignored = ["verifier_lm_head.weight", "verifier_norm.weight", "embed_tokens.weight"]
        if draft_vocab == vocab:
            ignored.append("lm_head.weight")
        self._keys_to_ignore_on_save = ignored
        window = config.sliding_window
        self.window = window
        # full-attention layers always see the whole block; sliding ones only when asked
        self.causal_block = window is not None and not config.sliding_window_non_causal
        # Training settings (not saved; see configure_training).
        self.max_anchors = 128
        self.position_weight = "dpace"
        self.dpace_alpha = 0.5
        self.decay_gamma = 4.0
        self.objective: WeightedObjective = resolve_objective("ce")
        self.noise_std = 0.0
        self.attn_implementation = "sdpa"
        self.post_init()
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ weights

    def compact_frozen_parts(self) -> int:
        """The verifier's embedding in bf16 when every value is a bf16 value: the same
        numbers in half the memory (see :func:`~speculators_core.modeling.compact.compact_frozen`)."""
        return compact_frozen(self.embed_tokens)

    def verifier_owned_modules(self) -> tuple[nn.Module, ...]:
        return (self.embed_tokens, self.lm_head, self.verifier_lm_head, self.verifier_norm)

    def freeze_verifier_parts(self) -> None:
        """Everything trains except the verifier's parts: embedding and both heads (as upstream)."""
        for module in self.verifier_owned_modules():
            module.weight.requires_grad_(False)

    def configure_training(
        self,
        *,
        max_anchors: int | None = None,
        position_weight: str | None = None,
        dpace_alpha: float | None = None,
        decay_gamma: float | None = None,
        objective: str | WeightedObjective | None = None,
        noise_std: float | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        """Change training-only settings (not saved with the checkpoint)."""
        if max_anchors is not None:
            if max_anchors < 1:
                raise SpeculatorsError(f"max_anchors must be at least 1, got {max_anchors}")
            self.max_anchors = int(max_anchors)
        if position_weight is not None:
            if position_weight not in POSITION_WEIGHTS:
                raise SpeculatorsError(
                    f"position_weight '{position_weight}' is not one of "
                    f"{', '.join(POSITION_WEIGHTS)}"
                )
            self.position_weight = position_weight
        if dpace_alpha is not None:
            if not 0 <= dpace_alpha <= 1:
                raise SpeculatorsError(f"dpace_alpha must be in [0, 1], got {dpace_alpha}")
            self.dpace_alpha = float(dpace_alpha)
        if decay_gamma is not None:
            if decay_gamma <= 0:
                raise SpeculatorsError(f"decay_gamma must be > 0, got {decay_gamma}")
            self.decay_gamma = float(decay_gamma)
        if objective is not None:
            self.objective = resolve_objective(objective)
        if noise_std is not None:
            if noise_std < 0:
                raise SpeculatorsError(f"noise_std must be >= 0, got {noise_std}")
            self.noise_std = float(noise_std)
        if attn_implementation is not None:
            if attn_implementation not in ("sdpa", "eager"):
                raise SpeculatorsError(
                    f"attn_implementation '{attn_implementation}' is not supported for DFlash "
                    "yet; use 'sdpa' or 'eager'"
                )
            self.attn_implementation = attn_implementation

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        *,
        num_layers: int = 1,
        block_size: int = 8,
        draft_vocab_size: int | None = None,
        token_counts: Mapping[int, int] | torch.Tensor | None = None,
        d2t: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        aux_layer_ids: list[int] | tuple[int, ...] | None = None,
        mask_token_id: int | None = None,
        max_anchors: int = 128,
        position_weight: str = "dpace",
        dpace_alpha: float = 0.5,
        decay_gamma: float = 4.0,
        objective: str | WeightedObjective = "ce",
        noise_std: float = 0.0,
        speculative_tokens: int | None = None,
        verifier_name_or_path: str | None = None,
        attn_implementation: str = "sdpa",
        **unknown: Any,
    ) -> DFlashDraftModel:
        """A fresh DFlash draft for the verifier in folder ``verifier``.

        * ``num_layers``: draft decoder layers (default 1: vLLM for CPU normalizes the context
          keys of every layer with layer 0's ``k_norm``, FORMAT-PARALLEL.md 3.5, so deeper
          drafts may lose acceptance there).
        * ``block_size``: the anchor plus ``block_size - 1`` mask slots; the recorded
          ``speculative_tokens`` is ``block_size - 1`` unless given.
        * ``draft_vocab_size``/``token_counts``/``d2t``/``t2d``: the draft vocabulary, as for
          EAGLE-3.
        * ``aux_layer_ids``: verifier layers feeding ``fc`` (default ``[2, N//2, N-3]``).
        * ``mask_token_id``: default :func:`~speculators_eagle3.peagle.resolve_mask_token_id`.
        * ``max_anchors``, ``position_weight``, ``dpace_alpha``, ``decay_gamma``, ``objective``,
          ``noise_std``, ``attn_implementation``: training settings (:meth:`configure_training`).
        """
        if unknown:
            raise SpeculatorsError(
                f"unknown dflash option(s) {', '.join(sorted(unknown))}; see "
                "DFlashDraftModel.from_verifier for the options"
            )
        if num_layers < 1:
            raise SpeculatorsError(f"num_layers must be at least 1, got {num_layers}")
        if block_size < 2:
            raise SpeculatorsError(f"block_size must be at least 2, got {block_size}")
        if speculative_tokens is not None and speculative_tokens < 1:
            raise SpeculatorsError(
                f"speculative_tokens must be at least 1, got {speculative_tokens}"
            )
        vconfig = load_verifier_config(verifier)
        n_layers, vocab = int(vconfig.num_hidden_layers), int(vconfig.vocab_size)
        ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n_layers)
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) > n_layers:
            raise SpeculatorsError(
                f"aux layer ids {ids} must be distinct ids in 0..{n_layers} for a verifier with "
                f"{n_layers} layers; pass aux_layer_ids explicitly"
            )
        mapping = resolve_vocab_mapping(vocab, draft_vocab_size, token_counts, d2t, t2d)
        token = resolve_mask_token_id(verifier, vocab) if mask_token_id is None else mask_token_id
        layer_fields = draft_layer_fields(vconfig, model_type="qwen3", num_layers=num_layers)
        tokens = block_size - 1 if speculative_tokens is None else speculative_tokens
        config = DFlashSpeculatorConfig(
            transformer_layer_config=layer_fields,
            draft_vocab_size=vocab if mapping is None else int(mapping[0].shape[0]),
            block_size=block_size,
            aux_hidden_state_layer_ids=ids,
            mask_token_id=int(token),
            # no sliding-window layers: the block is bidirectional, and vLLM must know
            sliding_window_non_causal=True,
            sample_from_anchor=False,
            speculators_config=SpeculatorsConfig(
                algorithm="dflash",
                proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=tokens)],
                default_proposal_method="greedy",
                verifier=VerifierConfig.from_pretrained(
                    verifier, name_or_path=verifier_name_or_path
                ),
            ),
        )
        model = cls(config)
        if mapping is not None and model.d2t is not None and model.t2d is not None:
            model.d2t.copy_(mapping[0])
            model.t2d.copy_(mapping[1])
        model.configure_training(
            max_anchors=max_anchors,
            position_weight=position_weight,
            dpace_alpha=dpace_alpha,
            decay_gamma=decay_gamma,
            objective=objective,
            noise_std=noise_std,
            attn_implementation=attn_implementation,
        )
        model.attach_verifier_parts(verifier)
        return model

    @torch.no_grad()
    def attach_verifier_parts(self, verifier: str | os.PathLike[str]) -> None:
        """Load the verifier's embedding, final norm and LM-head rows (and ``lm_head`` when the
        file has none)."""
        verifier_config, parts = self.read_verifier(
            verifier,
            vocab_size=self.config.verifier_vocab_size,
            hidden_size=self.config.aux_hidden_size,
        )
        self._sync_t2d()
        device, dtype = self.fc.weight.device, self.fc.weight.dtype
        rows = self._draft_rows(parts.lm_head.to(device))
        self.verifier_lm_head.weight.copy_(rows.to(dtype))
        self.verifier_norm.weight.copy_(parts.final_norm.to(device=device, dtype=dtype))
        self.verifier_norm.eps = float(getattr(verifier_config, "rms_norm_eps", self.norm.eps))
        if torch.isnan(self.embed_tokens.weight).any():
            self.embed_tokens.weight.copy_(parts.embed_tokens.to(device=device, dtype=dtype))
        if torch.isnan(self.lm_head.weight).any():
            self.lm_head.weight.copy_(rows.to(dtype))
        self.verifier_num_layers = int(verifier_config.num_hidden_layers)
        self.verifier_parts_attached = True
        self.freeze_verifier_parts()

    # ------------------------------------------------------------------ the forward pieces

    @property
    def mask_token_id(self) -> int:
        if self.config.mask_token_id is None:
            raise SpeculatorsError(
                "config: mask_token_id is not set; write the mask token the draft was trained "
                "with (vLLM cannot serve a DFlash draft without it)"
            )
        return int(self.config.mask_token_id)

    def context_states(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """``c = hidden_norm(fc(aux))``: ``[..., n*Ht] -> [..., H]``."""
        return self.hidden_norm(self.fc(aux_hidden_states.to(self.fc.weight.dtype)))

    def write_context(self, context: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> None:
        """Every layer's keys/values of context states ``[B, T, H]`` at ``positions`` ``[B, T]``."""
        rotary = self.rotary_emb(context, positions)
        for layer in self.layers:
            cast(DFlashLayer, layer).write_context(context, rotary, cache)

    def run_block(
        self,
        tokens: torch.Tensor,  # [B, Q]
        positions: torch.Tensor,  # [B, Q]
        cache: KVCache,  # every layer's context keys/values already in
        mask: torch.Tensor,  # [B or 1, 1, Q, context + Q]
    ) -> torch.Tensor:
        """The decoder output ``[B, Q, H]`` of block tokens over the cached context."""
        h = self.embed_tokens(tokens).to(self.fc.weight.dtype)
        rotary = self.rotary_emb(h, positions)
        for layer in self.layers:
            h = layer(h, rotary, cache=cache, mask=mask, implementation=self.attn_implementation)
        return cast(torch.Tensor, h)

    # ------------------------------------------------------------------ algorithm contract

    @classmethod
    def hidden_state_spec_for_verifier(
        cls, verifier: str | os.PathLike[str], **options: Any
    ) -> HiddenStateSpec:
        """The aux ids (``aux_layer_ids`` or the default) and ``N``, from the verifier's config."""
        return aux_state_spec(verifier, options.get("aux_layer_ids"))

    def hidden_state_spec(self) -> HiddenStateSpec:
        """The aux ids, then ``N`` (the verifier's final pre-norm state, for the targets)."""
        ids = self.config.aux_hidden_state_layer_ids
        if not ids:
            raise SpeculatorsError(
                "config: aux_hidden_state_layer_ids is not set; write the verifier layer ids "
                "the draft was trained on"
            )
        return HiddenStateSpec(layer_ids=(*ids, self._num_verifier_layers()))

    def choose_anchors(
        self, loss_mask: torch.Tensor, document_ids: torch.Tensor, count: int
    ) -> torch.Tensor:
        """Up to ``count`` random anchors of one row ``[T]``, ascending: supervised positions
        with context before them in their document and a scored slot after them."""
        doc = document_ids
        ok = loss_mask.bool() & (doc >= 0)
        ok[0] = False
        ok[1:] &= doc[1:] == doc[:-1]  # context: the previous position is in the document
        nxt = torch.zeros_like(ok)
        nxt[:-1] = (doc[1:] == doc[:-1]) & loss_mask[1:].bool()
        candidates = (ok & nxt).nonzero().squeeze(1)
        if candidates.numel() > count:
            pick = torch.randperm(candidates.numel(), device="cpu")[:count]
            candidates = candidates[pick.to(candidates.device)].sort().values
        return candidates

    def block_states(
        self,
        aux: torch.Tensor,  # [T, n*Ht] of one row
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        document_ids: torch.Tensor,  # [T]
        anchors: torch.Tensor,  # [A]
    ) -> torch.Tensor:
        """The decoder output ``[A, B, H]`` of every anchor's block, in one forward."""
        size = self.config.block_size
        context = self.context_states(aux)[None]  # [1, T, H]
        cache = KVCache(len(self.layers))
        self.write_context(context, position_ids[None], cache)
        tokens = torch.full((anchors.shape[0], size), self.mask_token_id, device=anchors.device)
        tokens[:, 0] = input_ids[anchors]
        offsets = torch.arange(size, device=anchors.device)
        positions = position_ids[anchors][:, None] + offsets[None, :]
        mask = block_attention_mask(
            document_ids, anchors, size, causal_block=self.causal_block, window=self.window
        )
        h = self.run_block(tokens.reshape(1, -1), positions.reshape(1, -1), cache, mask[None, None])
        return h.reshape(anchors.shape[0], size, -1)

    def draft_logits(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The first drafted token of a block after every position, over the verifier vocabulary.

        ``features`` ``[B, T, n*Ht]`` are the aux states of positions ``0..T-1`` and
        ``input_ids[:, t]`` is the token at ``t + 1``. For every ``t`` the context is positions
        ``0..t`` and the block (``block_size`` slots: ``input_ids[:, t]`` as the anchor at
        ``t + 1``, then mask slots) runs as when drafting; the result ``[B, T, V]`` (float64,
        ``-inf`` outside the draft vocabulary) is mask slot 1's logits, the draft's guess of the
        token at ``t + 2``. Every tensor of the draft takes part, which is what
        ``speculators convert --validate`` needs.
        """
        batch, length = input_ids.shape
        device = self.fc.weight.device
        full = torch.full(
            (batch, length, self.config.verifier_vocab_size), float("-inf"), dtype=torch.float64
        )
        # Unshifted rows of T + 1 positions: the anchor of position a = t + 1 is input_ids[t]
        # and its context is positions < a, exactly as a training anchor.
        positions = torch.arange(length + 1, device=device)
        documents = torch.zeros(length + 1, dtype=torch.long, device=device)
        anchors = positions[1:]
        with torch.no_grad():
            for row in range(batch):
                aux = torch.cat(
                    [features[row].to(device), features.new_zeros(1, features.shape[-1]).to(device)]
                )
                ids = torch.cat([input_ids.new_zeros(1), input_ids[row]]).to(device)
                h = self.block_states(aux, ids, positions, documents, anchors)  # [T, B, H]
                logits = self.lm_head(self.norm(h[:, 1]))  # [T, Vd]
                full[row][:, self.draft_to_target_ids().cpu()] = logits.double().cpu()
        return full

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        hidden_states: torch.Tensor,  # [B, T, n_aux + 1, Ht] in hidden_state_spec() order
        loss_mask: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        document_ids: torch.Tensor,  # [B, T], -1 on padding
    ) -> TrainingStepOutput:
        """The training step on unshifted packed rows (see the module doc)."""
        self._require_verifier_parts()
        n_aux = self.config.num_aux_states
        if hidden_states.dim() != 4 or hidden_states.shape[2] != n_aux + 1:
            raise SpeculatorsError(
                f"training batch hidden_states has shape {tuple(hidden_states.shape)}, expected "
                f"[B, T, {n_aux + 1}, Ht] ({n_aux} aux states + the final state, in "
                "hidden_state_spec() order)"
            )
        dtype = self.fc.weight.dtype
        size = self.config.block_size
        logits_all: list[torch.Tensor] = []
        targets_all: list[torch.Tensor] = []
        slots_all: list[torch.Tensor] = []
        blocks_all: list[torch.Tensor] = []
        scored_all: list[torch.Tensor] = []
        block_offset = 0
        for row in range(input_ids.shape[0]):
            docs = document_ids[row]
            anchors = self.choose_anchors(loss_mask[row], docs, self.max_anchors)
            if anchors.numel() == 0:
                continue
            aux = hidden_states[row, :, :n_aux].flatten(1).to(dtype)  # [T, n*Ht]
            last = hidden_states[row, :, n_aux].to(dtype)  # [T, Ht]
            if self.training and self.noise_std > 0:
                aux = aux + (torch.rand_like(aux) - 0.5) * (2 * self.noise_std)
                last = last + (torch.rand_like(last) - 0.5) * (2 * self.noise_std)
            h = self.block_states(aux, input_ids[row], position_ids[row], docs, anchors)
            # slot i of anchor a predicts x_{a+i}: scored where it exists, is supervised and in
            # the anchor's document (slot 0, the anchor itself, never is)
            length = docs.shape[0]
            predicted = anchors[:, None] + torch.arange(size, device=anchors.device)[None, :]
            inside = predicted < length
            clamped = predicted.clamp(max=length - 1)
            scored = (
                inside & (docs[clamped] == docs[anchors][:, None]) & loss_mask[row][clamped].bool()
            )
            scored[:, 0] = False
            picked = scored.nonzero()  # [N, 2]: block, slot
            rows = h[picked[:, 0], picked[:, 1]]  # [N, H]
            logits_all.append(self.lm_head(self.norm(rows)))
            with torch.no_grad():
                source = last[clamped[picked[:, 0], picked[:, 1]] - 1]
                targets_all.append(self.verifier_lm_head(self.verifier_norm(source)))
            slots_all.append(picked[:, 1])
            blocks_all.append(picked[:, 0] + block_offset)
            scored_all.append(scored)
            block_offset += anchors.shape[0]
        if not logits_all:
            zero = self.fc.weight.sum() * 0.0  # no anchor in the batch: a zero loss on the graph
            return TrainingStepOutput(loss=zero, metrics={}, weights={})
        logits = torch.cat(logits_all)
        target = TargetDistribution.from_logits(torch.cat(targets_all))
        slots, blocks = torch.cat(slots_all), torch.cat(blocks_all)
        scored = torch.cat(scored_all)  # [A, B]
        per_slot = self.objective(logits, target)  # [N]
        with torch.no_grad():
            log_q = torch.log_softmax(logits.float(), dim=-1)
            confidence = torch.zeros(scored.shape, device=logits.device)
            confidence[blocks, slots] = log_q.gather(1, target.ids[:, None])[:, 0].exp()
            weight = position_weights(
                self.position_weight,
                scored,
                confidence,
                alpha=self.dpace_alpha,
                gamma=self.decay_gamma,
            )[blocks, slots]
        loss = (weight * per_slot).sum() / max(1, per_slot.numel())
        return TrainingStepOutput(
            loss=loss, **_slot_metrics(logits, target.ids, blocks, slots, per_slot, scored)
        )

    def draft_session(self, *, batch_size: int = 1) -> DFlashDraftSession:
        """A :class:`DFlashDraftSession` for the reference decoder."""
        return DFlashDraftSession(self, batch_size=batch_size)


def _slot_metrics(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    blocks: torch.Tensor,
    slots: torch.Tensor,
    per_slot: torch.Tensor,
    scored: torch.Tensor,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-slot loss and acceptance: ``full_acc_{i-1}`` is the fraction of blocks scored at
    slot ``i`` whose slots ``1..i`` are all right (``i`` drafted tokens accepted),
    ``cond_acc_{i-1}`` the same among those right up to ``i - 1``."""
    with torch.no_grad():
        right = torch.zeros(scored.shape, dtype=torch.bool, device=scored.device)
        right[blocks, slots] = logits.argmax(dim=-1) == target_ids
        chain = torch.cumprod(right[:, 1:].long(), dim=1).bool()  # [A, B-1]
        metrics: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for slot in range(1, scored.shape[1]):
            here = scored[:, slot]
            count = here.sum()
            if int(count) == 0:
                break
            name = slot - 1
            full = chain[:, slot - 1] & here
            before = here if slot == 1 else here & chain[:, slot - 2]
            metrics[f"loss_{name}"] = per_slot[slots == slot].mean().detach()
            weights[f"loss_{name}"] = count
            metrics[f"full_acc_{name}"] = full.sum() / count
            weights[f"full_acc_{name}"] = count
            metrics[f"cond_acc_{name}"] = full.sum() / before.sum().clamp(min=1)
            weights[f"cond_acc_{name}"] = before.sum()
        weights["loss"] = torch.tensor(float(per_slot.numel()))
    return {"metrics": metrics, "weights": weights}


class DFlashDraftSession:
    """Drafting with a DFlash draft for the reference decoder (the core's ``DraftSession``).

    The cache holds every layer's keys/values of the verified positions that have states (the
    context). ``propose(k)`` runs one block (the newest verified token and ``k`` mask slots)
    over it and drops the block again.
    """

    def __init__(self, model: DFlashDraftModel, *, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise SpeculatorsError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.device = model.fc.weight.device
        self.cache = KVCache(len(model.layers))
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.num_context = 0  # positions whose context keys are cached

    @torch.no_grad()
    def extend(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Append verified tokens ``[B, m]`` and the states ``[B, m', n(+1), Ht]`` now known."""
        if token_ids.dim() != 2 or token_ids.shape[0] != self.batch_size:
            raise SpeculatorsError(
                f"extend() token_ids must be [{self.batch_size}, m], got {tuple(token_ids.shape)}"
            )
        new_states = token_ids.shape[1] - (1 if self.tokens.shape[1] == 0 else 0)
        n_aux = self.model.config.num_aux_states
        if (
            hidden_states.dim() != 4
            or hidden_states.shape[:2] != (self.batch_size, new_states)
            or hidden_states.shape[2] not in (n_aux, n_aux + 1)
        ):
            raise SpeculatorsError(
                f"extend() hidden_states must be [{self.batch_size}, {new_states}, {n_aux} or "
                f"{n_aux + 1}, Ht], got {tuple(hidden_states.shape)}"
            )
        self.cache.truncate(self.num_context)
        self.tokens = torch.cat([self.tokens, token_ids.to(self.device)], dim=1)
        if new_states == 0:
            return
        aux = hidden_states[:, :, :n_aux].to(self.device).flatten(2)
        context = self.model.context_states(aux)
        positions = torch.arange(
            self.num_context, self.num_context + new_states, device=self.device
        )
        self.model.write_context(context, positions.expand(self.batch_size, -1), self.cache)
        self.num_context += new_states

    @torch.no_grad()
    def propose(
        self, k: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> DraftProposal:
        """Draft ``k`` tokens after the verified context in one block forward (greedy when
        ``temperature`` is 0, else each slot sampled from ``softmax(logits / temperature)``)."""
        if k < 1:
            raise SpeculatorsError(f"propose() needs k >= 1, got {k}")
        if self.num_context == 0:
            raise SpeculatorsError(
                "propose() before any verified hidden state; call extend() with the prompt first"
            )
        model = self.model
        self.cache.truncate(self.num_context)
        anchor = self.tokens[:, self.num_context]  # the newest verified token
        tokens = torch.full((self.batch_size, k + 1), model.mask_token_id, device=self.device)
        tokens[:, 0] = anchor
        positions = torch.arange(self.num_context, self.num_context + k + 1, device=self.device)
        keys = torch.arange(self.num_context + k + 1, device=self.device)
        query_pos = positions[:, None]
        mask = keys[None, :] < self.num_context  # context: every earlier position
        if model.window is not None:
            mask = mask & (keys[None, :] >= self.num_context - model.window)
        block = keys[None, :] >= self.num_context
        if model.causal_block:
            block = block & (keys[None, :] <= query_pos)
        mask = (mask | block)[None, None]  # [1, 1, k+1, context + k+1]
        h = model.run_block(tokens, positions.expand(self.batch_size, -1), self.cache, mask)
        self.cache.truncate(self.num_context)
        logits = model.lm_head(model.norm(h[:, 1:]))  # [B, k, Vd]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
            draft_ids = drawn.view(self.batch_size, k)
        else:
            draft_ids = logits.argmax(dim=-1)
        ids = model.draft_to_target_ids()
        full = logits.new_full((*logits.shape[:2], model.config.verifier_vocab_size), float("-inf"))
        full[..., ids] = logits
        return DraftProposal(tokens=ids[draft_ids], logits=full)
