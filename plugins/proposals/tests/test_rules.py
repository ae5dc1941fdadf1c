"""The acceptance rules on toy models: the emitted tokens follow the verifier exactly, and block
verification keeps at least as many drafted tokens as the token-by-token rule.

The toy verifier and draft are fixed random next-token tables over a 4-token vocabulary, a
different distribution for every prefix, so every position of a round sees its own ``p_i`` and
``q_i``. Generation runs whole rounds until three tokens are out; the empirical joint of those
three tokens is compared with the verifier's exact product ``p(x1) p(x2|x1) p(x3|x1,x2)`` by a
chi-square test.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import cache

import pytest
import torch
from speculators_proposals import block_rule

from speculators_core.proposals import one_hot_rows, standard_rule
from speculators_core.testing import chi_square_p_value

VOCAB, K, SAMPLES = 4, 3, 12000
ALPHA = 1e-3  # significance of every chi-square test here


@cache
def table(kind: str, prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed random next-token distribution of the toy ``kind`` after ``prefix``."""
    seed = zlib.crc32(repr((kind, prefix)).encode())  # the same tables in every process
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 1.5
    if kind == "draft":  # related to the verifier, as a trained draft is, but not equal
        logits = 0.6 * table_logits("verifier", prefix) + 0.8 * logits
    return torch.softmax(logits, dim=-1)


def table_logits(kind: str, prefix: tuple[int, ...]) -> torch.Tensor:
    return torch.log(table(kind, prefix))


Rule = Callable[..., tuple[int, int]]


def one_round(
    prefix: tuple[int, ...], rule: Rule, sample_draft: bool, generator: torch.Generator
) -> tuple[list[int], int]:
    """One round after ``prefix``: the emitted tokens and how many drafted ones were kept."""
    drafted: list[int] = []
    rows = []
    for _ in range(K):
        q = table("draft", prefix + tuple(drafted))
        token = (
            int(torch.multinomial(q, 1, generator=generator)) if sample_draft else int(q.argmax())
        )
        rows.append(q)
        drafted.append(token)
    tokens = torch.tensor(drafted)
    draft_probs = torch.stack(rows) if sample_draft else one_hot_rows(tokens, VOCAB)
    target = torch.stack([table("verifier", prefix + tuple(drafted[:i])) for i in range(K + 1)])
    accepted, nxt = rule(tokens, draft_probs, target, generator)
    return [*drafted[:accepted], nxt], accepted


def first_tokens(rule: Rule, sample_draft: bool, seed: int) -> torch.Tensor:
    """Counts of the first three generated tokens (as one index of VOCAB**3) over SAMPLES runs."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB**3)
    for _ in range(SAMPLES):
        out: list[int] = []
        while len(out) < 3:
            emitted, _ = one_round(tuple(out), rule, sample_draft, generator)
            out += emitted
        a, b, c = out[:3]
        counts[(a * VOCAB + b) * VOCAB + c] += 1
    return counts


def exact_first_tokens() -> torch.Tensor:
    probs = torch.zeros(VOCAB**3)
    for a in range(VOCAB):
        for b in range(VOCAB):
            for c in range(VOCAB):
                probs[(a * VOCAB + b) * VOCAB + c] = (
                    table("verifier", ())[a]
                    * table("verifier", (a,))[b]
                    * table("verifier", (a, b))[c]
                )
    return probs


def residual_from_target(drafted, draft_probs, target_probs, generator=None):
    """A wrong rule (the negative control): on rejection it draws from p, not from max(0, p-q)."""
    accepted, _ = standard_rule(drafted, draft_probs, target_probs, generator)
    return accepted, int(torch.multinomial(target_probs[accepted], 1, generator=generator))


@pytest.mark.parametrize(
    "rule, sample_draft",
    [(standard_rule, False), (standard_rule, True), (block_rule, True), (block_rule, False)],
    ids=["greedy-standard", "sampled-standard", "sampled-block", "argmax-block"],
)
def test_the_emitted_tokens_follow_the_verifier(rule: Rule, sample_draft: bool) -> None:
    counts = first_tokens(rule, sample_draft, seed=1)
    assert chi_square_p_value(counts, exact_first_tokens()) > ALPHA


def test_the_chi_square_test_has_power() -> None:
    """The same test, samples and significance reject a rule that is slightly wrong."""
    counts = first_tokens(residual_from_target, True, seed=1)
    assert chi_square_p_value(counts, exact_first_tokens()) < ALPHA


def test_block_verification_keeps_at_least_what_token_by_token_keeps() -> None:
    """Mean kept drafted tokens per round from the same contexts: block >= standard within a
    four-standard-error margin (the paper proves it is never lower in expectation)."""
    kept: dict[str, torch.Tensor] = {}
    for name, rule in (("standard", standard_rule), ("block", block_rule)):
        generator = torch.Generator().manual_seed(7)
        values = []
        for i in range(SAMPLES):
            prefix = (i % VOCAB, (i // VOCAB) % VOCAB)
            values.append(one_round(prefix, rule, True, generator)[1])
        kept[name] = torch.tensor(values, dtype=torch.float64)
    difference = kept["block"].mean() - kept["standard"].mean()
    standard_error = (kept["block"].var() / SAMPLES + kept["standard"].var() / SAMPLES).sqrt()
    assert float(difference) >= -4 * float(standard_error)


def test_one_drafted_token_block_is_the_standard_rule() -> None:
    """At k = 1, h_1 = w_1 = min(1, p/q) and the residual is max(0, p - q): the same draws."""
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        q = torch.softmax(torch.randn(1, VOCAB, generator=generator), dim=-1)
        p = torch.softmax(torch.randn(2, VOCAB, generator=generator), dim=-1)
        drafted = torch.multinomial(q, 1, generator=generator)[:, 0]
        a = block_rule(drafted, q, p, torch.Generator().manual_seed(seed))
        b = standard_rule(drafted, q, p, torch.Generator().manual_seed(seed))
        # u <= h against u < h differ only on a zero-probability event
        assert a == b
