"""Every proposal method in the reference decoder: lossless at temperature 0 (token for token)
and at temperature 1 (in distribution), selected through the plugin host by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from speculators_core import PluginHost, PluginSettings, get_host
from speculators_core.evaluate import ReferenceDecoder
from speculators_core.testing import chi_square_p_value

ALPHA = 1e-3  # significance of the chi-square tests
METHODS = ["greedy", "sampled", "block", "tree"]
PROMPT = [5, 17, 42, 9, 101]


@pytest.fixture(scope="module")
def draft(tiny_verifier: Path) -> Any:
    eagle3 = pytest.importorskip("speculators_eagle3")
    torch.manual_seed(0)
    model = eagle3.Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3])
    return model.eval()


def plain_greedy(verifier: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(verifier(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", METHODS)
def test_temperature_zero_is_the_verifier_alone(name: str, verifier_model: Any, draft: Any):
    decoder = ReferenceDecoder(
        verifier_model, draft, k=3, proposal=get_host().proposal_method(name)
    )
    out = decoder.generate(PROMPT, max_new_tokens=12).tokens
    assert out == plain_greedy(verifier_model, PROMPT, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_sampled_output_keeps_the_verifier_distribution(
    name: str, verifier_model: Any, draft: Any
) -> None:
    """The second generated token (the round's first) over 1500 seeded runs against the exact
    marginal sum_a p(a) p(b | a); the same counts reject the uniform distribution (power)."""
    temperature = 1.0
    with torch.no_grad():
        first = torch.softmax(
            verifier_model(torch.tensor([PROMPT])).logits[0, -1] / temperature, -1
        )
        vocab = first.shape[0]
        batch = torch.cat(
            [torch.tensor([PROMPT]).repeat(vocab, 1), torch.arange(vocab)[:, None]], 1
        )
        second = torch.softmax(verifier_model(batch).logits[:, -1] / temperature, dim=-1)
    exact = (first[:, None] * second).sum(0)
    method = get_host().proposal_method(name)
    decoder = ReferenceDecoder(verifier_model, draft, k=2, proposal=method)
    generator = torch.Generator().manual_seed(11)
    counts = torch.zeros(vocab)
    accepted = 0
    for _ in range(1500):
        result = decoder.generate(
            PROMPT, max_new_tokens=2, temperature=temperature, generator=generator
        )
        counts[result.tokens[1]] += 1
        accepted += result.stats.num_accepted
    assert chi_square_p_value(counts, exact) > ALPHA
    assert chi_square_p_value(counts, torch.full((vocab,), 1.0 / vocab)) < ALPHA
    assert accepted > 0  # drafted tokens were kept: the rule, not only the fallback, ran


def test_methods_come_from_the_plugin_and_greedy_needs_none() -> None:
    """Without speculators-proposals (a host that loads no entry points) only greedy exists, and
    asking for another method names what to install."""
    bare = PluginHost(PluginSettings(), entry_points=False)
    assert sorted(bare.proposal_methods()) == ["greedy"]
    with pytest.raises(Exception, match="sampled"):
        bare.proposal_method("sampled")
    installed = get_host().proposal_methods()
    assert {"greedy", "sampled", "block", "tree"} <= set(installed)
    assert installed["sampled"].provided_by.startswith("speculators-proposals")
    assert dict(installed["sampled"].vllm.speculative_config) == {
        "draft_sample_method": "probabilistic"
    }
    assert installed["block"].vllm.cpu_refusal
    assert installed["greedy"].vllm.speculative_config == {}
    assert installed["tree"].vllm is None and installed["tree"].round is not None


def test_config_classes_round_trip_extra_fields() -> None:
    from speculators_proposals import (
        BlockTokenProposalConfig,
        SampledTokenProposalConfig,
        TreeTokenProposalConfig,
    )

    for cls, name in (
        (SampledTokenProposalConfig, "sampled"),
        (BlockTokenProposalConfig, "block"),
        (TreeTokenProposalConfig, "tree"),
    ):
        config = cls(speculative_tokens=2, note="kept")
        data = config.model_dump()
        assert data["proposal_type"] == name and data["note"] == "kept"
        assert cls.model_validate(data) == config
