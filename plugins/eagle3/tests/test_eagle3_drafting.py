"""The drafting session against the model's forward run from scratch at every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_helpers import AUX_IDS, capture_states
from speculators_eagle3 import Eagle3DraftModel
from speculators_eagle3.alignment import align_batch

from speculators_core import DraftSession, SpeculatorsError

K = 3
SPEC = [*AUX_IDS, 4]  # aux states + the final state, as the decoder passes them


def make_draft(verifier: Path, **options: Any) -> Eagle3DraftModel:
    counts = torch.arange(259) % 23
    model = Eagle3DraftModel.from_verifier(
        verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=120, token_counts=counts, **options
    )
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


@torch.no_grad()
def from_scratch(
    model: Eagle3DraftModel, tokens: torch.Tensor, states: torch.Tensor, drafted: torch.Tensor
) -> list[torch.Tensor]:
    """Draft logits ``[Vd]`` of each step after verified ``tokens`` ``[L+1]`` (states ``[L, n, H]``).

    Runs the full TTT forward over the sequence extended by the drafted tokens: at the last
    verified index, step ``s`` then reads drafted token ``s - 1`` (teacher forcing = the draft's
    own tokens), exactly what a decoder with no cache would compute.
    """
    length = states.shape[0]
    seq = torch.cat([tokens, drafted[: K - 1]])
    padded = torch.zeros(seq.shape[0], *states.shape[1:])
    padded[:length] = states  # positions past the verified context have no states; unused
    aligned = align_batch(
        seq[None],
        padded[None],
        torch.ones(1, seq.shape[0], dtype=torch.long),
        torch.arange(seq.shape[0])[None],
        torch.zeros(1, seq.shape[0], dtype=torch.long),
    )
    logits = model.ttt_forward(
        aligned.aux_hidden_states,
        aligned.input_ids,
        aligned.document_ids,
        aligned.position_ids,
        steps=K,
        attn_implementation="eager",
    )
    return [step[0, length - 1] for step in logits]


def simulate(
    model: Eagle3DraftModel, verifier_model: Any, prompts: torch.Tensor, rounds: int, seed: int
) -> None:
    """Drive a session like a decoder (random acceptance), checking every proposal from scratch."""
    batch = prompts.shape[0]
    generator = torch.Generator().manual_seed(seed)
    session = model.draft_session(batch_size=batch)
    assert isinstance(session, DraftSession)
    tokens = prompts.clone()
    session.extend(
        tokens, torch.stack([capture_states(verifier_model, r, SPEC)[:-1] for r in tokens])
    )
    target_ids = model.draft_to_target_ids()
    for _ in range(rounds):
        proposal = session.propose(K)
        assert proposal.tokens.shape == (batch, K) and proposal.logits.shape == (batch, K, 259)
        for row in range(batch):
            states = capture_states(verifier_model, tokens[row], SPEC)[:-1]
            expected = from_scratch(model, tokens[row], states, proposal.tokens[row])
            for step in range(K):
                got = proposal.logits[row, step, target_ids]
                torch.testing.assert_close(got, expected[step], rtol=1e-4, atol=1e-5)
                assert int(proposal.tokens[row, step]) == int(target_ids[expected[step].argmax()])
            outside = torch.ones(259, dtype=torch.bool)
            outside[target_ids] = False
            assert torch.isinf(proposal.logits[row, :, outside]).all()
        # The decoder accepts a prefix of the draft (same length for every row) plus one token.
        accepted = int(torch.randint(0, K + 1, (1,), generator=generator))
        bonus = torch.randint(0, 259, (batch, 1), generator=generator)
        new = torch.cat([proposal.tokens[:, :accepted], bonus], dim=1)
        old_length = tokens.shape[1]
        tokens = torch.cat([tokens, new], dim=1)
        # States now exist for the previously pending token and all new ones but the newest.
        new_states = torch.stack(
            [capture_states(verifier_model, r, SPEC)[old_length - 1 : -1] for r in tokens]
        )
        session.extend(new, new_states)


@pytest.mark.parametrize("options", [{}, {"norm_output": True, "num_layers": 2}])
def test_session_equals_forward_from_scratch(
    tiny_verifier: Path, verifier_model: Any, options: dict[str, Any]
) -> None:
    """Batch size 1: every proposal of every round equals the from-scratch forward."""
    model = make_draft(tiny_verifier, **options)
    prompt = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    simulate(model, verifier_model, prompt, rounds=5, seed=2)


def test_session_batch_rows_are_independent(tiny_verifier: Path, verifier_model: Any) -> None:
    """Batch size 2: each row's proposals equal its own from-scratch forward."""
    model = make_draft(tiny_verifier)
    prompts = torch.randint(0, 259, (2, 5), generator=torch.Generator().manual_seed(4))
    simulate(model, verifier_model, prompts, rounds=3, seed=5)


def test_sampling_uses_the_generator(tiny_verifier: Path, verifier_model: Any) -> None:
    """With temperature, tokens are drawn from softmax(logits / T) with the given generator."""
    model = make_draft(tiny_verifier)
    prompt = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(8))
    states = capture_states(verifier_model, prompt[0], SPEC)[None, :-1]
    session = model.draft_session()
    session.extend(prompt, states)
    proposal = session.propose(1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    target_ids = model.draft_to_target_ids()
    draft_logits = proposal.logits[0, 0, target_ids]
    probs = torch.softmax(draft_logits / 0.7, dim=-1)
    expected = torch.multinomial(probs[None], 1, generator=torch.Generator().manual_seed(3))
    assert int(proposal.tokens[0, 0]) == int(target_ids[expected[0, 0]])
    again = session.propose(1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.tokens, proposal.tokens)


def test_session_errors(tiny_verifier: Path) -> None:
    """Misuse is a one-line SpeculatorsError."""
    model = make_draft(tiny_verifier)
    session = model.draft_session()
    with pytest.raises(SpeculatorsError, match="before any verified hidden state"):
        session.propose(2)
    with pytest.raises(SpeculatorsError, match="hidden_states must be"):
        session.extend(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 4, 64))
    with pytest.raises(SpeculatorsError, match="token_ids must be"):
        session.extend(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, 4, 64))
    session.extend(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 0, 3, 64))
    with pytest.raises(SpeculatorsError, match="before any verified hidden state"):
        session.propose(1)
    with pytest.raises(SpeculatorsError, match="batch_size"):
        model.draft_session(batch_size=0)
