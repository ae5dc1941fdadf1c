"""Drafting with an EAGLE-3 draft: the session the reference speculative decoder drives.

The session keeps the draft's KV cache over *draft indices*: index ``t`` pairs the verifier's
aux states of position ``t`` with token ``x_{t+1}`` (exactly as in training), at RoPE position
``t + 1``. After ``extend`` the cache covers every index whose states are known, and the output
at the newest one already holds the logits of the first drafted token. ``propose(k)`` then runs
``k - 1`` more steps, each feeding back the drafted token and the draft's own state, and appends
those drafted positions to the cache; the next ``extend`` (or ``propose``) drops them again.

Rows of a batch advance in lockstep (every ``extend`` gives each row the same number of tokens),
which is what the :class:`~speculators_core.drafting.DraftSession` protocol's shapes express.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from speculators_core import DraftProposal, SpeculatorsError
from speculators_eagle3.attention import KVCache

if TYPE_CHECKING:
    from speculators_eagle3.model import Eagle3DraftModel

__all__ = ["Eagle3DraftSession"]


class Eagle3DraftSession:
    """Per-generation drafting state of an :class:`~speculators_eagle3.model.Eagle3DraftModel`."""

    def __init__(self, model: Eagle3DraftModel, *, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise SpeculatorsError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        device = model.fc.weight.device
        self.cache = KVCache(len(model.layers))
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # x_0..x_L
        self.num_indices = 0  # draft indices in the cache = positions with verifier states
        self._logits: torch.Tensor | None = None  # [B, Vd] at the newest index
        self._state: torch.Tensor | None = None  # [B, H] fed to the next draft step
        # Drafting attends over few queries; flex's block masks buy nothing here.
        self._implementation = "eager" if model.attn_implementation == "eager" else "sdpa"

    @property
    def num_aux_states(self) -> int:
        """How many aux states ``fc`` reads (``extend`` may also carry the final state after them)."""
        return self.model.config.num_aux_states

    @torch.no_grad()
    def extend(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Append verified tokens ``[B, m]`` and the states ``[B, m', n, Ht]`` now available.

        The first call has ``m' = m - 1`` (the newest token awaits its states), later calls
        ``m' = m``. ``n`` is the number of aux states, or that plus one (the final state of the
        hidden-state spec, which drafting does not use).
        """
        model = self.model
        if token_ids.dim() != 2 or token_ids.shape[0] != self.batch_size:
            raise SpeculatorsError(
                f"extend() token_ids must be [{self.batch_size}, m], got {tuple(token_ids.shape)}"
            )
        first_call = self.tokens.shape[1] == 0
        new_states = token_ids.shape[1] - (1 if first_call else 0)
        n_aux = self.num_aux_states
        if (
            hidden_states.dim() != 4
            or hidden_states.shape[0] != self.batch_size
            or hidden_states.shape[1] != new_states
            or hidden_states.shape[2] not in (n_aux, n_aux + 1)
        ):
            raise SpeculatorsError(
                f"extend() hidden_states must be [{self.batch_size}, {new_states}, {n_aux} or "
                f"{n_aux + 1}, Ht] for {token_ids.shape[1]} new tokens, got "
                f"{tuple(hidden_states.shape)}"
            )
        device = model.fc.weight.device
        self.cache.truncate(self.num_indices)  # forget drafted positions
        self.tokens = torch.cat([self.tokens, token_ids.to(device)], dim=1)
        if new_states == 0:
            return
        start = self.num_indices
        aux = hidden_states[:, :, :n_aux].to(device=device, dtype=model.fc.weight.dtype)
        feature = model.combine_aux(aux.flatten(2))  # [B, m', H]
        next_tokens = self.tokens[:, start + 1 : start + 1 + new_states]  # x_{t+1}
        positions = torch.arange(start + 1, start + 1 + new_states, device=device)
        positions = positions.expand(self.batch_size, -1)
        # New queries see all cached indices and the new ones up to themselves.
        key_index = torch.arange(start + new_states, device=device)
        query_index = torch.arange(start, start + new_states, device=device)
        mask = (key_index[None, :] <= query_index[:, None])[None, None]  # [1, 1, m', start+m']
        h = model.decode(
            next_tokens,
            feature,
            positions,
            cache=self.cache,
            mask=mask,
            implementation=self._implementation,
        )
        logits, state = model.head(h[:, -1])
        self._logits, self._state = logits, state
        self.num_indices = start + new_states

    @torch.no_grad()
    def propose(
        self, k: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> DraftProposal:
        """Draft ``k`` tokens after the verified context.

        Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)``
        over the draft vocabulary. ``logits`` in the proposal are the raw draft logits mapped to
        the verifier vocabulary (``-inf`` outside the draft vocabulary).
        """
        if k < 1:
            raise SpeculatorsError(f"propose() needs k >= 1, got {k}")
        if self._logits is None or self._state is None:
            raise SpeculatorsError(
                "propose() before any verified hidden state; call extend() with the prompt first"
            )
        model = self.model
        self.cache.truncate(self.num_indices)
        target_ids = model.draft_to_target_ids()  # [Vd]
        logits, state = self._logits, self._state
        tokens, step_logits = [], []
        for i in range(k):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                draft_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                draft_token = logits.argmax(dim=-1)
            token = target_ids[draft_token]  # [B] verifier ids
            tokens.append(token)
            step_logits.append(logits)
            if i == k - 1:
                break
            position = torch.full(
                (self.batch_size, 1), self.num_indices + 1 + i, device=token.device
            )
            h = model.decode(
                token[:, None],
                state[:, None],
                position,
                cache=self.cache,
                mask=None,  # a single query sees the whole cache
                implementation=self._implementation,
            )
            logits, state = model.head(h[:, -1])
        draft_logits = torch.stack(step_logits, dim=1)  # [B, k, Vd]
        full = draft_logits.new_full(
            (*draft_logits.shape[:2], model.config.verifier_vocab_size), float("-inf")
        )
        full[..., target_ids] = draft_logits
        return DraftProposal(tokens=torch.stack(tokens, dim=1), logits=full)
