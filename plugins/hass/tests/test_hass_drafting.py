"""The drafting session against drafting from scratch at every round, and in the reference decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hass_helpers import capture_features, draft_from_scratch, perturb
from speculators_hass import EagleDraftModel

from speculators_core import DraftSession, SpeculatorsError
from speculators_core.evaluate import ReferenceDecoder

K = 3
VOCAB = 259


def make_draft(verifier: Path, **options: Any) -> EagleDraftModel:
    model = EagleDraftModel.from_verifier(verifier, **options)
    perturb(model, seed=11)
    return model.eval()


@torch.no_grad()
def expected_proposal(
    model: EagleDraftModel, tokens: torch.Tensor, features: torch.Tensor, drafted: torch.Tensor
) -> list[torch.Tensor]:
    """Draft logits ``[V]`` of each of the ``K`` steps after verified ``tokens`` ``[L+1]``.

    Step ``i`` predicts from a true context ending at index ``L - 1`` plus ``i`` own predictions,
    reading the drafted tokens ``0 .. i-1`` (what a decoder without a cache would compute).
    """
    length = features.shape[0]
    seq = torch.cat([tokens, drafted[: K - 1]])
    padded = torch.zeros(seq.shape[0], features.shape[1])
    padded[:length] = features  # indices past the verified context use their own predictions
    positions = torch.arange(seq.shape[0])
    return [
        model.head(draft_from_scratch(model, seq, padded, positions, length - 1, i))
        for i in range(K)
    ]


def simulate(
    model: EagleDraftModel, verifier_model: Any, prompts: torch.Tensor, rounds: int, seed: int
) -> None:
    """Drive a session like a decoder (random acceptance), checking every proposal from scratch."""
    batch = prompts.shape[0]
    generator = torch.Generator().manual_seed(seed)
    session = model.draft_session(batch_size=batch)
    assert isinstance(session, DraftSession)
    tokens = prompts.clone()
    session.extend(tokens, torch.stack([capture_features(verifier_model, r)[:-1] for r in tokens]))
    for _ in range(rounds):
        proposal = session.propose(K)
        assert proposal.tokens.shape == (batch, K) and proposal.logits.shape == (batch, K, VOCAB)
        for row in range(batch):
            features = capture_features(verifier_model, tokens[row])[:-1, 0]
            expected = expected_proposal(model, tokens[row], features, proposal.tokens[row])
            for step in range(K):
                torch.testing.assert_close(
                    proposal.logits[row, step], expected[step], rtol=1e-4, atol=1e-5
                )
                assert int(proposal.tokens[row, step]) == int(expected[step].argmax())
        # The decoder accepts a prefix of the draft (same length for every row) plus one token.
        accepted = int(torch.randint(0, K + 1, (1,), generator=generator))
        bonus = torch.randint(0, VOCAB, (batch, 1), generator=generator)
        new = torch.cat([proposal.tokens[:, :accepted], bonus], dim=1)
        old_length = tokens.shape[1]
        tokens = torch.cat([tokens, new], dim=1)
        # Features now exist for the previously pending token and all new ones but the newest.
        new_states = torch.stack(
            [capture_features(verifier_model, r)[old_length - 1 : -1] for r in tokens]
        )
        session.extend(new, new_states)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layernorms": True, "fusion_bias": True},
        {"layernorms": True, "feature_norm_before_fc": True},
    ],
)
def test_session_equals_drafting_from_scratch(
    tiny_verifier: Path, verifier_model: Any, options: dict[str, Any]
) -> None:
    """Batch size 1: every proposal of every round equals drafting from scratch."""
    model = make_draft(tiny_verifier, **options)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    simulate(model, verifier_model, prompt, rounds=5, seed=2)


def test_session_batch_rows_are_independent(tiny_verifier: Path, verifier_model: Any) -> None:
    """Batch size 2: each row's proposals equal its own from-scratch drafting."""
    model = make_draft(tiny_verifier)
    prompts = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    simulate(model, verifier_model, prompts, rounds=3, seed=5)


def test_sampling_uses_the_generator(tiny_verifier: Path, verifier_model: Any) -> None:
    """With temperature, tokens are drawn from softmax(logits / T) with the given generator."""
    model = make_draft(tiny_verifier)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    session = model.draft_session()
    session.extend(prompt, capture_features(verifier_model, prompt[0])[None, :-1])
    proposal = session.propose(1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(proposal.logits[0, 0] / 0.7, dim=-1)
    expected = torch.multinomial(probs[None], 1, generator=torch.Generator().manual_seed(3))
    assert int(proposal.tokens[0, 0]) == int(expected[0, 0])
    again = session.propose(1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.tokens, proposal.tokens)


def test_reference_decoder_is_lossless_with_the_draft(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """The core's reference decoder with this draft reproduces the verifier's greedy output."""
    model = make_draft(tiny_verifier)
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(6)).tolist()
    alone = ReferenceDecoder(verifier_model, None).generate(prompt, max_new_tokens=20)
    with_draft = ReferenceDecoder(verifier_model, model, k=K).generate(prompt, max_new_tokens=20)
    assert with_draft.tokens == alone.tokens
    assert with_draft.stats.rounds > 0


def test_session_errors(tiny_verifier: Path) -> None:
    """Misuse is a one-line SpeculatorsError."""
    model = make_draft(tiny_verifier)
    session = model.draft_session()
    with pytest.raises(SpeculatorsError, match="before any verified hidden state"):
        session.propose(2)
    with pytest.raises(SpeculatorsError, match="hidden_states must be"):
        session.extend(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 1, 64))
    with pytest.raises(SpeculatorsError, match="hidden_states must be"):
        session.extend(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, 2, 64))
    with pytest.raises(SpeculatorsError, match="token_ids must be"):
        session.extend(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, 1, 64))
    session.extend(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 0, 1, 64))
    with pytest.raises(SpeculatorsError, match="before any verified hidden state"):
        session.propose(1)
    with pytest.raises(SpeculatorsError, match="propose\\(\\) needs k >= 1"):
        session.propose(0)
    with pytest.raises(SpeculatorsError, match="batch_size"):
        model.draft_session(batch_size=0)
    unattached = EagleDraftModel(model.config)
    with pytest.raises(SpeculatorsError, match="not attached"):
        unattached.draft_session()
