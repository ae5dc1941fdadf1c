"""Chain drafting over a KV cache: the session machinery EAGLE-style drafts share.

A :class:`ChainDraftSession` implements the :class:`~speculators_core.drafting.DraftSession`
protocol for drafts that run one decoder step per token, feeding each step's output state back
as the next step's feature (EAGLE-1/2/HASS, EAGLE-3). The cache holds *draft indices*: index
``t`` pairs the verifier's states of position ``t`` with token ``x_{t+1}``, at RoPE position
``t + position_offset`` (as in the algorithm's training). After :meth:`~ChainDraftSession.extend`
the cache covers every index whose states are known, and the output at the newest one already
holds the first drafted token's logits and the state that follows. ``propose(k)`` runs ``k - 1``
more steps, each feeding back the drafted token and the draft's own state, and appends those
drafted indices to the cache; the next ``extend`` (or ``propose``) drops them again.

Rows of a batch advance in lockstep (every ``extend`` gives each row the same number of tokens),
which is what the protocol's shapes express.

An algorithm subclasses it and says how verifier states become the draft's input feature
(:meth:`~ChainDraftSession.input_features`), how a decoder output becomes logits and the next
state (:meth:`~ChainDraftSession.head`), and, for a reduced draft vocabulary, the verifier ids of
the draft ids (:meth:`~ChainDraftSession.draft_vocabulary`). The model's ``decode``
(:class:`ChainDraftModel`) runs one step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from speculators_core.drafting import DraftProposal
from speculators_core.errors import SpeculatorsError
from speculators_core.modeling.attention import KVCache

__all__ = ["ChainDraftModel", "ChainDraftSession"]


class ChainDraftModel(Protocol):
    """What a :class:`ChainDraftSession` calls on its model: one draft step over a cache."""

    def decode(
        self,
        input_ids: torch.Tensor,  # [B, T]
        feature: torch.Tensor,  # [B, T, H]
        position_ids: torch.Tensor,  # [B, T]
        *,
        cache: KVCache,
        mask: Any,
        implementation: str,
    ) -> torch.Tensor:
        """The decoder output ``[B, T, H]`` of one step."""
        ...


class ChainDraftSession(ABC):
    """Per-generation drafting state of a chain-drafting model (see the module docstring).

    ``num_layers`` is the number of cached decoder layers, ``device``/``dtype`` those of the
    draft's weights, ``implementation`` the attention kernel (``sdpa`` or ``eager``) and
    ``position_offset`` the RoPE position of draft index 0.
    """

    def __init__(
        self,
        model: ChainDraftModel,
        *,
        batch_size: int,
        num_layers: int,
        device: torch.device,
        implementation: str,
        position_offset: int = 0,
    ) -> None:
        if batch_size < 1:
            raise SpeculatorsError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.cache = KVCache(num_layers)
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # x_0..x_L
        self.num_indices = 0  # draft indices in the cache = positions with verifier states
        self.position_offset = position_offset
        self._implementation = implementation
        self._logits: torch.Tensor | None = None  # [B, Vd] at the newest index
        self._state: torch.Tensor | None = None  # [B, H] fed to the next draft step

    # ------------------------------------------------------------------ algorithm hooks

    @abstractmethod
    def check_hidden_states(self, hidden_states: torch.Tensor, new_states: int) -> None:
        """Raise a :class:`~speculators_core.errors.SpeculatorsError` unless ``hidden_states``
        is ``[B, new_states, ...]`` in the layout the algorithm drafts from."""

    @abstractmethod
    def input_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The draft's input features ``[B, m, H]`` of verifier states ``[B, m, n, Ht]``."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits ``[B, Vd]`` and the state fed to the next step ``[B, H]`` of an output."""

    def draft_vocabulary(self) -> tuple[torch.Tensor, int] | None:
        """``(ids, V)``: the verifier ids ``[Vd]`` of draft ids ``0..Vd-1`` and the verifier's
        vocabulary size, or None when the draft's logits are over the verifier's ids."""
        return None

    # ------------------------------------------------------------------ the protocol

    @torch.no_grad()
    def extend(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Append verified tokens ``[B, m]`` and the states ``[B, m', n, Ht]`` now available.

        The first call has ``m' = m - 1`` (the newest token awaits its states), later calls
        ``m' = m``.
        """
        if token_ids.dim() != 2 or token_ids.shape[0] != self.batch_size:
            raise SpeculatorsError(
                f"extend() token_ids must be [{self.batch_size}, m], got {tuple(token_ids.shape)}"
            )
        first_call = self.tokens.shape[1] == 0
        new_states = token_ids.shape[1] - (1 if first_call else 0)
        self.check_hidden_states(hidden_states, new_states)
        device = self.device
        self.cache.truncate(self.num_indices)  # forget drafted indices
        self.tokens = torch.cat([self.tokens, token_ids.to(device)], dim=1)
        if new_states == 0:
            return
        start = self.num_indices
        feature = self.input_features(hidden_states)  # [B, m', H]
        next_tokens = self.tokens[:, start + 1 : start + 1 + new_states]  # x_{t+1}
        first = start + self.position_offset
        positions = torch.arange(first, first + new_states, device=device)
        positions = positions.expand(self.batch_size, -1)
        # New queries see every cached index and the new ones up to themselves.
        key_index = torch.arange(start + new_states, device=device)
        query_index = torch.arange(start, start + new_states, device=device)
        mask = (key_index[None, :] <= query_index[:, None])[None, None]  # [1, 1, m', start+m']
        h = self.model.decode(
            next_tokens,
            feature,
            positions,
            cache=self.cache,
            mask=mask,
            implementation=self._implementation,
        )
        self._logits, self._state = self.head(h[:, -1])
        self.num_indices = start + new_states

    @torch.no_grad()
    def next_logits(self, path: Sequence[int]) -> torch.Tensor:
        """The draft's logits ``[V]`` (verifier vocabulary, ``-inf`` outside a reduced draft
        vocabulary) for the token after the verified context followed by the drafted ``path``
        (verifier ids), batch size 1: what a tree proposal expands a node with."""
        if self.batch_size != 1:
            raise SpeculatorsError("next_logits() drafts for batch size 1")
        if self._logits is None or self._state is None:
            raise SpeculatorsError(
                "next_logits() before any verified hidden state; call extend() with the prompt first"
            )
        self.cache.truncate(self.num_indices)
        logits, state = self._logits, self._state
        for i, token in enumerate(path):
            logits, state = self._step(torch.tensor([int(token)], device=self.device), state, i)
        self.cache.truncate(self.num_indices)
        return self._to_verifier_vocab(logits)[0]

    def _step(
        self, token: torch.Tensor, state: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``token`` ``[B]`` (verifier ids) as the ``offset``-th drafted token after the
        verified context, from the draft state ``state`` ``[B, H]``; the cache keeps its key and
        value. Returns the next ``(logits [B, Vd], state [B, H])``."""
        position = torch.full(
            (self.batch_size, 1),
            self.num_indices + self.position_offset + offset,
            device=token.device,
        )
        h = self.model.decode(
            token[:, None],
            state[:, None],
            position,
            cache=self.cache,
            mask=None,  # a single query sees the whole cache
            implementation=self._implementation,
        )
        return self.head(h[:, -1])

    def _to_verifier_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``[..., Vd]`` over the verifier vocabulary ``[..., V]``:
        ``-inf`` outside a reduced draft vocabulary (unchanged for a full one)."""
        vocabulary = self.draft_vocabulary()
        if vocabulary is None:
            return logits
        ids, vocab = vocabulary
        full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
        full[..., ids] = logits
        return full

    @torch.no_grad()
    def propose(
        self, k: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> DraftProposal:
        """Draft ``k`` tokens after the verified context.

        Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)``
        over the draft vocabulary. ``logits`` in the proposal are the raw draft logits over the
        verifier vocabulary (``-inf`` outside a reduced draft vocabulary).
        """
        if k < 1:
            raise SpeculatorsError(f"propose() needs k >= 1, got {k}")
        if self._logits is None or self._state is None:
            raise SpeculatorsError(
                "propose() before any verified hidden state; call extend() with the prompt first"
            )
        self.cache.truncate(self.num_indices)
        vocabulary = self.draft_vocabulary()
        target_ids = None if vocabulary is None else vocabulary[0]  # [Vd]
        logits, state = self._logits, self._state
        tokens, step_logits = [], []
        for i in range(k):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                draft_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                draft_token = logits.argmax(dim=-1)
            token = draft_token if target_ids is None else target_ids[draft_token]  # [B]
            tokens.append(token)
            step_logits.append(logits)
            if i == k - 1:
                break
            logits, state = self._step(token, state, i)
        draft_logits = self._to_verifier_vocab(torch.stack(step_logits, dim=1))  # [B, k, V]
        return DraftProposal(tokens=torch.stack(tokens, dim=1), logits=draft_logits)
