"""The reference speculative decoder: losslessness, acceptance counting, rejection sampling."""

from __future__ import annotations

import pytest
import torch
from speculators_fixture_good.plugin import FixtureMlpSpeculator

from speculators_core import DraftProposal, HiddenStateSpec
from speculators_core.evaluate import DecodeStats, ReferenceDecoder, accept_sampled
from speculators_core.testing import chi_square_p_value


@pytest.fixture(scope="module")
def verifier(tiny_verifier):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_verifier).eval()


def plain_greedy(verifier, prompt: list[int], n: int) -> list[int]:
    """The verifier alone, recomputing the whole sequence each step (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(verifier(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


class OracleDraft(torch.nn.Module):
    """A 'draft' that proposes the verifier's own greedy tokens, optionally wrong at one position."""

    def __init__(self, verifier, wrong_at: int | None = None) -> None:
        super().__init__()
        self.verifier = verifier
        self.wrong_at = wrong_at
        self.num_layers = verifier.config.num_hidden_layers

    def hidden_state_spec(self) -> HiddenStateSpec:
        return HiddenStateSpec(layer_ids=(self.num_layers,))

    def draft_session(self, *, batch_size: int = 1):
        return OracleSession(self)


class OracleSession:
    def __init__(self, draft: OracleDraft) -> None:
        self.draft = draft
        self.tokens: list[int] = []
        self.states = 0

    def extend(self, token_ids, hidden_states) -> None:
        self.tokens += token_ids[0].tolist()
        self.states += hidden_states.shape[1]
        # The session holds one more token than it has states for.
        assert self.states == len(self.tokens) - 1

    def propose(self, k, *, temperature=0.0, generator=None) -> DraftProposal:
        ctx = list(self.tokens)
        out, logits = [], []
        with torch.no_grad():
            for i in range(k):
                step = self.draft.verifier(torch.tensor([ctx])).logits[0, -1]
                token = int(step.argmax())
                if i == self.draft.wrong_at:
                    token = (token + 1) % step.shape[0]
                out.append(token)
                logits.append(step)
                ctx.append(token)
        return DraftProposal(tokens=torch.tensor([out]), logits=torch.stack(logits)[None])


PROMPT = [1, 40, 41, 42, 43, 44]


def test_greedy_with_a_random_draft_equals_the_verifier_alone(verifier, tiny_verifier):
    torch.manual_seed(0)
    draft = FixtureMlpSpeculator.from_verifier(tiny_verifier)
    expected = plain_greedy(verifier, PROMPT, 24)
    for k in (1, 3):
        result = ReferenceDecoder(verifier, draft, k=k).generate(PROMPT, max_new_tokens=24)
        assert result.tokens == expected
    assert ReferenceDecoder(verifier, None).generate(PROMPT, max_new_tokens=24).tokens == expected


@pytest.mark.parametrize("wrong_at", [None, 0, 1, 2])
def test_acceptance_is_counted_per_position(verifier, wrong_at):
    k, n = 3, 25
    result = ReferenceDecoder(verifier, OracleDraft(verifier, wrong_at), k=k).generate(
        PROMPT, max_new_tokens=n
    )
    assert result.tokens == plain_greedy(verifier, PROMPT, n)
    stats = result.stats
    per_round = k if wrong_at is None else wrong_at  # accepted drafted tokens in every round
    # The first token comes from prefill; each round then emits per_round + 1 tokens.
    expected_rounds = -(-(n - 1) // (per_round + 1))
    assert stats.rounds == expected_rounds
    assert stats.accepted_per_position == [
        expected_rounds if i < per_round else 0 for i in range(k)
    ]
    assert stats.mean_acceptance_length == pytest.approx(1 + per_round)
    assert stats.verifier_forwards == 1 + expected_rounds


def test_generation_stops_after_end_of_sequence(verifier):
    expected = plain_greedy(verifier, PROMPT, 12)
    eos = expected[4]
    stop = expected.index(eos)
    result = ReferenceDecoder(verifier, OracleDraft(verifier), k=3, eos_token_ids=[eos]).generate(
        PROMPT, max_new_tokens=12
    )
    assert result.tokens == expected[: stop + 1]


def test_rejection_step_emits_the_target_distribution():
    """The first emitted token of a round is distributed as p_0, whatever q is."""
    gen = torch.Generator().manual_seed(0)
    v, k, trials = 8, 3, 20000
    p = torch.softmax(torch.randn(k + 1, v, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, v, generator=gen) * 1.5, dim=-1)
    counts = torch.zeros(v)
    accepted_total = 0
    for _ in range(trials):
        drafted = torch.multinomial(q, 1, generator=gen)[:, 0]
        accepted, token = accept_sampled(drafted, q, p, gen)
        accepted_total += accepted
        first = int(drafted[0]) if accepted > 0 else token
        counts[first] += 1
    assert chi_square_p_value(counts, p[0]) > 1e-3
    # The acceptance probability of the first token is sum_x min(p, q) (Leviathan et al.).
    assert accepted_total > 0


def test_rejection_step_with_identical_distributions_accepts_everything():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 6, generator=gen), dim=-1)
    for _ in range(50):
        drafted = torch.multinomial(p[:3], 1, generator=gen)[:, 0]
        assert accept_sampled(drafted, p[:3], p, gen)[0] == 3


@pytest.mark.slow
def test_sampled_decoding_keeps_the_verifier_distribution(verifier, tiny_verifier):
    """Marginal of the first drafted token (the 2nd generated) equals the exact verifier marginal."""
    torch.manual_seed(0)
    draft = FixtureMlpSpeculator.from_verifier(tiny_verifier)
    temperature = 1.5
    with torch.no_grad():
        p1 = torch.softmax(verifier(torch.tensor([PROMPT])).logits[0, -1] / temperature, dim=-1)
        vocab = p1.shape[0]
        batch = torch.cat(
            [torch.tensor([PROMPT]).repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1
        )
        p2_given_1 = torch.softmax(verifier(batch).logits[:, -1] / temperature, dim=-1)
    exact_second = (p1[:, None] * p2_given_1).sum(0)

    decoder = ReferenceDecoder(verifier, draft, k=2)
    gen = torch.Generator().manual_seed(123)
    counts = torch.zeros(vocab)
    for _ in range(1500):
        tokens = decoder.generate(
            PROMPT, max_new_tokens=2, temperature=temperature, generator=gen
        ).tokens
        counts[tokens[1]] += 1
    assert chi_square_p_value(counts, exact_second) > 1e-3
    # Power check: the draft's own (very different) distribution is rejected by the same test.
    assert chi_square_p_value(counts, torch.full((vocab,), 1.0 / vocab)) < 1e-3


def test_stats_merge_and_derived_rates():
    a, b = DecodeStats(k=3), DecodeStats(k=3)
    for accepted in (3, 1, 0):
        a.add_round(accepted)
    b.add_round(2)
    a.merge(b)
    assert a.rounds == 4 and a.accepted_per_position == [3, 2, 1]
    assert a.mean_acceptance_length == pytest.approx(1 + 6 / 4)
    assert a.acceptance_rate_per_position == [0.75, 0.5, 0.25]
    assert a.conditional_acceptance_per_position == pytest.approx([0.75, 2 / 3, 0.5])


def test_decode_thread_choice_is_one_of_the_two_and_leaves_threads_as_they_were(verifier):
    from speculators_core.evaluate.reference import fastest_decode_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fastest_decode_threads(verifier) in (1, 2)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert fastest_decode_threads(verifier) == 1  # nothing to choose between
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
