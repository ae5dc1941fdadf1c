"""P-EAGLE: an EAGLE-3 draft that proposes all ``k`` tokens in one forward (FORMAT-PARALLEL.md 2).

The model is the EAGLE-3 draft plus one learned vector, ``mask_hidden`` (``[1, 1, n*Ht]``), and
a ``mask_token_id`` in its config. To draft ``k`` tokens after the newest verified position
``p``, the draft reads the usual slot at ``p`` (token ``x_{p+1}``, the verifier's aux states of
``p``) and ``k - 1`` *mask slots* at positions ``p + 1 .. p + k - 1``, each holding the mask
token and ``fc(mask_hidden)``, under the ordinary causal mask; slot ``i``'s logits are the
``i``-th drafted token. No drafted token is fed back, so one forward makes all ``k``.

Training (upstream 0.9.0's objective, FORMAT-PARALLEL.md 2.4), on the aligned row of EAGLE-3
(index ``t``: token ``x_{t+1}``, aux states of ``t``, target the verifier's distribution at
``t + 1``):

* **COD sampling** (:func:`cod_sample`): elements ``(a, d)``, an anchor index and a depth. Depth
  0 is every index; depth ``d >= 1`` keeps ``int((seeds - d) * max(r**d, r_min))`` indices of a
  candidate pool (first the loss-masked indices, at most ``max_anchors`` of them; then the
  kept indices plus one that are loss-masked), each kept ``q`` becoming ``(q - d, d)``. Every
  chain ``(a, 0), (a, 1), .., (a, d)`` is therefore complete.
* Element ``(a, d)`` reads token ``x_{a+1}`` and the aux states of ``a`` at depth 0, the mask
  token and ``mask_hidden`` deeper, at RoPE position ``position(a) + d``; query ``(a, d)``
  sees key ``(a', d')`` when both anchors lie in one document and either ``d' = 0`` and
  ``a' <= a`` or ``a' = a`` and ``d' <= d`` (:func:`peagle_attention_mask`): what vLLM's causal
  mask gives the mask slots at inference.
* Element ``(a, d)`` predicts the verifier's distribution at index ``a + d``; it is scored when
  that index is in the anchor's document and loss-masked (upstream scores across documents of a
  packed row; this does not). The loss is the objective's mean over every scored element of
  every depth (no per-depth weight), forward KL by default.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from speculators_core import SpeculatorsError, TrainingStepOutput
from speculators_core.drafting import DraftProposal
from speculators_core.head_loss import head_objective
from speculators_core.modeling import KVCache, select_attention_implementation
from speculators_core.objectives import TargetDistribution
from speculators_eagle3.config import PEagleSpeculatorConfig
from speculators_eagle3.drafting import Eagle3DraftSession
from speculators_eagle3.model import Eagle3DraftModel

logger = logging.getLogger(__name__)

__all__ = [
    "PEagleDraftModel",
    "PEagleDraftSession",
    "cod_sample",
    "peagle_attention_mask",
    "resolve_mask_token_id",
]


def cod_sample(
    loss_mask: torch.Tensor,
    *,
    num_depths: int,
    ratio: float = 0.7,
    ratio_min: float = 0.2,
    max_anchors: int | None = 512,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """COD elements of one aligned row (see the module doc): ``(anchors [E], depths [E])``.

    ``loss_mask`` is the row's ``[T]`` boolean mask. Depth 0 comes first (every index in
    order), then each depth's anchors in ascending order.
    """
    length = loss_mask.shape[0]
    device = loss_mask.device
    masked = loss_mask.bool()
    supervised = masked.nonzero().squeeze(1)  # ascending
    seeds = supervised
    if max_anchors is not None and seeds.numel() > max_anchors:
        pick = torch.randperm(seeds.numel(), generator=generator, device="cpu")[:max_anchors]
        seeds = seeds[pick.to(device)].sort().values
    anchors = [torch.arange(length, device=device)]
    depths = [torch.zeros(length, dtype=torch.long, device=device)]
    pool = seeds
    for depth in range(1, num_depths):
        size = int(max(0, seeds.numel() - depth) * max(ratio**depth, ratio_min))
        if size <= 0:
            break
        if pool.numel() >= size:
            pick = torch.randperm(pool.numel(), generator=generator, device="cpu")[:size]
            kept = pool[pick.to(device)].sort().values
        else:
            kept = pool
        anchors.append(kept - depth)
        depths.append(torch.full_like(kept, depth))
        following = kept + 1
        following = following[following < length]
        pool = following[masked[following]]
    return torch.cat(anchors), torch.cat(depths)


def peagle_attention_mask(
    anchors: torch.Tensor, depths: torch.Tensor, document_ids: torch.Tensor
) -> torch.Tensor:
    """``[E, E]`` boolean mask of COD elements, True = the query element sees the key element.

    ``document_ids`` is the aligned row's ``[T]`` (-1: takes no part). An element whose anchor
    takes no part sees only itself (a row of the softmax must not be empty).
    """
    doc = document_ids[anchors]  # [E]
    same_doc = doc[:, None] == doc[None, :]
    real = (doc >= 0)[:, None]
    context = (depths[None, :] == 0) & (anchors[None, :] <= anchors[:, None])
    own_chain = (anchors[None, :] == anchors[:, None]) & (depths[None, :] <= depths[:, None])
    diagonal = torch.eye(anchors.numel(), dtype=torch.bool, device=anchors.device)
    return (real & same_doc & (context | own_chain)) | diagonal


def resolve_mask_token_id(verifier: str | os.PathLike[str], vocab_size: int) -> int:
    """The mask token of a verifier without one given: its tokenizer's mask token, else the
    first id past the tokenizer when the embedding has unused rows, else its pad, eos or unk
    token (the order upstream's trainer uses)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(verifier))
    except (OSError, ValueError) as err:
        raise SpeculatorsError(
            f"cannot read the tokenizer of '{verifier}' to choose the mask token ({err}); pass "
            "mask_token_id"
        ) from err
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < vocab_size:
        return len(tokenizer)  # the id a newly added <|MASK|> token would get
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise SpeculatorsError(
        f"the tokenizer of '{verifier}' has no mask, pad, eos or unk token and no unused "
        "embedding row; pass mask_token_id"
    )


def _sliding_window(config: PEagleSpeculatorConfig) -> int | None:
    """The window of the draft's sliding-window layers, or None when it has none."""
    layer = config.layer_config
    types = getattr(layer, "layer_types", None) or []
    sliding = getattr(layer, "use_sliding_window", False) or "sliding_attention" in types
    window = getattr(layer, "sliding_window", None)
    return int(window) if sliding and window else None


class PEagleDraftModel(Eagle3DraftModel):
    """A P-EAGLE draft: :class:`~speculators_eagle3.model.Eagle3DraftModel` plus ``mask_hidden``.

    Build one with :meth:`from_verifier`; it trains with COD sampling (see the module doc),
    drafts ``k`` tokens per forward (:meth:`draft_session`) and saves the speculators
    ``peagle`` format that vLLM 0.32 serves as ``eagle3`` with ``parallel_drafting``.
    """

    config_class = PEagleSpeculatorConfig
    config: PEagleSpeculatorConfig
    algorithm_name = "peagle"
    # Upstream's trainer marks every P-EAGLE layer sliding-window (2048) by default; such
    # drafts load and run with full attention here, the same on contexts shorter than the window.
    _runs_windows_in_full = True
    _ARCHITECTURE_FIELDS = (*Eagle3DraftModel._ARCHITECTURE_FIELDS, "mask_token_id")

    def __init__(self, config: PEagleSpeculatorConfig) -> None:
        super().__init__(config)
        window = _sliding_window(config)
        if window is not None:
            logger.warning(
                "this P-EAGLE draft's layers use a %d-token sliding window; they run with full "
                "attention here (the same on contexts shorter than the window; vLLM applies it)",
                window,
            )
        width = config.num_aux_states * config.aux_hidden_size
        # The feature of every mask slot, before fc (and its input norm, if any).
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, width))
        # Training settings (not part of the saved format; see configure_training).
        self.num_depths = 8
        self.max_anchors: int | None = 512
        self.down_sample_ratio = 0.7
        self.down_sample_ratio_min = 0.2

    @property
    def mask_token_id(self) -> int:
        """The mask slots' token (a draft always records one)."""
        if self.config.mask_token_id is None:
            raise SpeculatorsError(
                "config: mask_token_id is not set; write the mask token the draft was trained "
                "with (vLLM cannot serve a P-EAGLE draft without it)"
            )
        return int(self.config.mask_token_id)

    def configure_training(
        self,
        *,
        num_depths: int | None = None,
        max_anchors: int | None = None,
        down_sample_ratio: float | None = None,
        down_sample_ratio_min: float | None = None,
        **eagle3: Any,
    ) -> None:
        """Change training-only settings: the COD sampling ones here, the rest
        (``objective``, ``noise_std``, ``attn_implementation``, ``train_lm_head``) as for
        EAGLE-3. ``max_anchors`` 0 means no limit."""
        if num_depths is not None:
            if num_depths < 1:
                raise SpeculatorsError(f"num_depths must be at least 1, got {num_depths}")
            self.num_depths = int(num_depths)
        if max_anchors is not None:
            if max_anchors < 0:
                raise SpeculatorsError(f"max_anchors must be >= 0 (0: no limit), got {max_anchors}")
            self.max_anchors = int(max_anchors) or None
        for name, value in (
            ("down_sample_ratio", down_sample_ratio),
            ("down_sample_ratio_min", down_sample_ratio_min),
        ):
            if value is not None:
                if not 0 < value <= 1:
                    raise SpeculatorsError(f"{name} must be in (0, 1], got {value}")
                setattr(self, name, float(value))
        if eagle3.get("attn_implementation") == "flex":
            raise SpeculatorsError(
                "attn_implementation 'flex' is not supported for P-EAGLE training yet; use "
                "'sdpa' or 'eager'"
            )
        super().configure_training(**eagle3)

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        *,
        num_depths: int = 8,
        max_anchors: int = 512,
        down_sample_ratio: float = 0.7,
        down_sample_ratio_min: float = 0.2,
        mask_token_id: int | None = None,
        speculative_tokens: int | None = None,
        embed_requires_grad: bool = True,
        fc_norm: bool = False,
        **options: Any,
    ) -> PEagleDraftModel:
        """A fresh P-EAGLE draft for the verifier in folder ``verifier``.

        * ``num_depths``: tokens drafted per forward in training (depths 0..num_depths-1);
          also the recorded ``speculative_tokens`` unless that is given.
        * ``max_anchors``, ``down_sample_ratio``, ``down_sample_ratio_min``: COD sampling
          (:func:`cod_sample`; ``max_anchors`` 0 = no limit).
        * ``mask_token_id``: the mask slots' token; default :func:`resolve_mask_token_id`.
        * ``embed_requires_grad``: train the embedding (default true, as upstream).
        * Every other option is :meth:`Eagle3DraftModel.from_verifier`'s (layers, vocabulary,
          norms, ``objective``, ``noise_std``, ``init_from``, ...). ``fc_norm`` is refused:
          vLLM does not read it for P-EAGLE drafts, so the served draft would differ from the
          trained one.
        """
        if fc_norm:
            raise SpeculatorsError(
                "fc_norm=true: vLLM ignores fc_norm for P-EAGLE drafts (it would serve the "
                "draft without those norms); use norm_before_fc instead"
            )
        for name in ("ttt_steps", "ttt_step_loss_decay"):
            if name in options:
                raise SpeculatorsError(
                    f"{name} is an EAGLE-3 option; a P-EAGLE draft trains all depths at once "
                    "(num_depths)"
                )
        if num_depths < 1:
            raise SpeculatorsError(f"num_depths must be at least 1, got {num_depths}")
        from speculators_core.modeling import load_verifier_config

        vocab = int(load_verifier_config(verifier).vocab_size)
        token = resolve_mask_token_id(verifier, vocab) if mask_token_id is None else mask_token_id
        model = super().from_verifier(
            verifier,
            speculative_tokens=num_depths if speculative_tokens is None else speculative_tokens,
            embed_requires_grad=embed_requires_grad,
            _config_fields={"mask_token_id": int(token)},
            **options,
        )
        assert isinstance(model, PEagleDraftModel)
        model.configure_training(
            num_depths=num_depths,
            max_anchors=max_anchors,
            down_sample_ratio=down_sample_ratio,
            down_sample_ratio_min=down_sample_ratio_min,
        )
        return model

    def mask_feature(self) -> torch.Tensor:
        """``fc`` (with its input norms) of ``mask_hidden``: the mask slots' feature ``[H]``."""
        return self.combine_aux(self.mask_hidden.to(self.fc.weight.dtype))[0, 0]

    # ------------------------------------------------------------------ training

    def element_states(
        self,
        aux: torch.Tensor,  # [T, n*Ht] aligned aux states of one row
        input_ids: torch.Tensor,  # [T] aligned (x_{t+1} at index t)
        position_ids: torch.Tensor,  # [T] aligned
        document_ids: torch.Tensor,  # [T] aligned, -1 = takes no part
        anchors: torch.Tensor,  # [E]
        depths: torch.Tensor,  # [E]
        *,
        implementation: str = "sdpa",
    ) -> torch.Tensor:
        """The decoder output ``[E, H]`` of COD elements ``(anchors, depths)`` of one row, all
        in one forward under :func:`peagle_attention_mask`."""
        deep = depths > 0
        tokens = torch.where(deep, self.mask_token_id, input_ids[anchors])
        feature = self.combine_aux(aux[anchors])  # [E, H]
        feature = torch.where(deep[:, None], self.mask_feature().expand_as(feature), feature)
        positions = position_ids[anchors] + depths
        return self.decode(
            tokens[None],
            feature[None],
            positions[None],
            cache=KVCache(len(self.layers)),
            mask=peagle_attention_mask(anchors, depths, document_ids)[None, None],
            implementation=implementation,
        )[0]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] unshifted, as the verifier saw them
        hidden_states: torch.Tensor,  # [B, T, n_aux + 1, Ht] in hidden_state_spec() order
        loss_mask: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        document_ids: torch.Tensor,  # [B, T], -1 on padding
    ) -> TrainingStepOutput:
        """The training step: align, noise, COD-sample, one forward over every element, loss."""
        aux, last, input_ids, position_ids, document_ids, loss_mask = self._training_inputs(
            input_ids, hidden_states, loss_mask, position_ids, document_ids
        )
        implementation = select_attention_implementation(self.attn_implementation, aux.device)
        if implementation == "flex":
            implementation = "sdpa"  # the element mask is dense; flex would need a block mask
        states_all: list[torch.Tensor] = []
        targets_all: list[torch.Tensor] = []
        depth_all: list[torch.Tensor] = []
        anchor_key: list[torch.Tensor] = []
        for row in range(input_ids.shape[0]):
            docs, mask_row = document_ids[row], loss_mask[row].bool() & (document_ids[row] >= 0)
            anchors, depths = cod_sample(
                mask_row,
                num_depths=self.num_depths,
                ratio=self.down_sample_ratio,
                ratio_min=self.down_sample_ratio_min,
                max_anchors=self.max_anchors,
            )
            h = self.element_states(
                aux[row], input_ids[row], position_ids[row], docs, anchors, depths,
                implementation=implementation,
            )  # fmt: skip
            target_index = anchors + depths
            inside = target_index < docs.shape[0]
            clamped = target_index.clamp(max=docs.shape[0] - 1)
            scored = (
                inside
                & (docs[anchors] >= 0)
                & (docs[clamped] == docs[anchors])
                & loss_mask[row, clamped].bool()
            )
            picked = scored.nonzero().squeeze(1)
            states_all.append(self.norm(h[picked]))  # [N_r, H]
            targets_all.append(last[row, target_index[picked]])  # [N_r, Ht]
            depth_all.append(depths[picked])
            # (row, anchor) identifies a chain across the rows of the batch
            anchor_key.append(anchors[picked] + row * docs.shape[0])
        states = torch.cat(states_all)
        self._require_verifier_parts()  # also when no row is scored
        targets = TargetDistribution.from_head(  # a chunk of rows at a time
            torch.cat(targets_all),
            self.verifier_logits,
            self.config.draft_vocab_size,
        )
        depths = torch.cat(depth_all)
        if self.lm_head.weight.requires_grad:  # a trainable head: score its logits
            logits = self.lm_head(states)  # [N, Vd]
            per_element = self.objective(logits, targets)  # [N]
            predicted = logits.detach().argmax(dim=-1)
        else:  # a frozen head: no [N, Vd] logits kept for the backward pass
            per_element, predicted = head_objective(
                states, self.lm_head.weight, self.objective.plain, targets
            )
        count = torch.tensor(float(per_element.numel()), device=states.device)
        loss = per_element.sum() / count.clamp(min=1)
        return TrainingStepOutput(
            loss=loss,
            **_depth_metrics(
                predicted, targets.ids, depths, torch.cat(anchor_key), per_element, self.num_depths
            ),
        )

    def draft_session(self, *, batch_size: int = 1) -> PEagleDraftSession:
        """A :class:`PEagleDraftSession` for the reference decoder."""
        return PEagleDraftSession(self, batch_size=batch_size)


def _depth_metrics(
    predicted: torch.Tensor,
    target_ids: torch.Tensor,
    depths: torch.Tensor,
    anchors: torch.Tensor,
    per_element: torch.Tensor,
    num_depths: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-depth loss and acceptance metrics of the scored elements.

    ``full_acc_d``: among scored depth-``d`` elements, the fraction whose whole chain
    ``(a, 0..d)`` is right (the chance that ``d + 1`` drafted tokens are all accepted);
    ``cond_acc_d``: the same among those whose chain up to ``d - 1`` is right. A chain link that
    was not scored counts as wrong.
    """
    with torch.no_grad():
        correct = predicted == target_ids  # [N]: the draft's argmax is the verifier's
        metrics: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        survivors: torch.Tensor | None = None
        for depth in range(num_depths):
            here = depths == depth
            count = here.sum()
            if int(count) == 0:
                break
            chain_ok = correct[here]
            if survivors is None:  # depth 0
                previous = torch.ones_like(chain_ok)
            else:  # the chain goes on only where the anchor's previous depth was right
                previous = torch.isin(anchors[here], survivors)
            full = chain_ok & previous
            survivors = anchors[here][full]
            metrics[f"loss_{depth}"] = per_element[here].mean().detach()
            weights[f"loss_{depth}"] = count
            metrics[f"full_acc_{depth}"] = full.float().mean()
            weights[f"full_acc_{depth}"] = count
            metrics[f"cond_acc_{depth}"] = full.sum() / previous.sum().clamp(min=1)
            weights[f"cond_acc_{depth}"] = previous.sum()
        metrics["loss"] = (
            per_element.mean().detach() if per_element.numel() else per_element.new_zeros(())
        )
        weights["loss"] = torch.tensor(float(per_element.numel()))
    return {"metrics": metrics, "weights": weights}


class PEagleDraftSession(Eagle3DraftSession):
    """Drafting with a P-EAGLE draft: ``extend`` as EAGLE-3, ``propose(k)`` in one forward.

    After ``extend`` the newest index's output holds the first drafted token's logits; the
    other ``k - 1`` come from mask slots at the next ``k - 1`` positions (see the module doc),
    appended to the cache for that one forward and dropped again by the next call.
    """

    model: PEagleDraftModel

    @torch.no_grad()
    def propose(
        self, k: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> DraftProposal:
        """Draft ``k`` tokens after the verified context, all in one forward (greedy when
        ``temperature`` is 0, else each sampled from ``softmax(logits / temperature)``)."""
        if k < 1:
            raise SpeculatorsError(f"propose() needs k >= 1, got {k}")
        if self._logits is None:
            raise SpeculatorsError(
                "propose() before any verified hidden state; call extend() with the prompt first"
            )
        self.cache.truncate(self.num_indices)
        slot_logits = [self._logits]  # [B, Vd] each
        if k > 1:
            model = self.model
            slots = k - 1
            token = torch.full(
                (self.batch_size, slots), model.mask_token_id, dtype=torch.long, device=self.device
            )
            feature = model.mask_feature().expand(self.batch_size, slots, -1)
            first = self.num_indices + self.position_offset
            positions = torch.arange(first, first + slots, device=self.device)
            positions = positions.expand(self.batch_size, -1)
            keys = torch.arange(self.num_indices + slots, device=self.device)
            queries = torch.arange(self.num_indices, self.num_indices + slots, device=self.device)
            mask = (keys[None, :] <= queries[:, None])[None, None]  # [1, 1, k-1, L+k-1]
            h = model.decode(
                token,
                feature,
                positions,
                cache=self.cache,
                mask=mask,
                implementation=self._implementation,
            )
            logits, _ = model.head(h)  # [B, k-1, Vd]
            slot_logits.extend(logits.unbind(dim=1))
        vocabulary = self.draft_vocabulary()
        target_ids = vocabulary[0]
        tokens = []
        for logits in slot_logits:
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                draft_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                draft_token = logits.argmax(dim=-1)
            tokens.append(target_ids[draft_token])
        draft_logits = torch.stack(slot_logits, dim=1)  # [B, k, Vd]
        ids, vocab = vocabulary
        full = draft_logits.new_full((*draft_logits.shape[:2], vocab), float("-inf"))
        full[..., ids] = draft_logits
        return DraftProposal(tokens=torch.stack(tokens, dim=1), logits=full)
