"""``est_accept_len``: derived by the core from per-position accuracies, weighted exactly."""

from __future__ import annotations

import random

import pytest
import torch

from speculators_core import TrainingStepOutput
from speculators_core.train.metrics import WeightedSums, derive_metrics, est_accept_len


def _chains(rng: random.Random, positions: int, steps: int) -> list[list[bool]]:
    """Per scored position, whether each draft step was correct (mostly right, then wrong)."""
    return [[rng.random() < 0.8 - 0.1 * s for s in range(steps)] for _ in range(positions)]


def _step_output(chains: list[list[bool]]) -> TrainingStepOutput:
    """What an algorithm following the convention reports for these positions."""
    steps = len(chains[0])
    metrics: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    alive = [True] * len(chains)
    for s in range(steps):
        survived = sum(alive)
        alive = [a and chain[s] for a, chain in zip(alive, chains)]
        hits = torch.tensor(sum(alive))
        count = torch.tensor(len(chains))
        metrics[f"full_acc_{s}"] = hits / count
        metrics[f"cond_acc_{s}"] = hits / max(survived, 1)
        weights[f"full_acc_{s}"] = count
        weights[f"cond_acc_{s}"] = torch.tensor(survived)
    loss = torch.tensor(1.0)
    return TrainingStepOutput(loss=loss, metrics=metrics, weights=weights)


def _plain_est(chains: list[list[bool]]) -> float:
    """1 + expected number of leading correct drafts, counted position by position."""
    total = 0
    for chain in chains:
        for correct in chain:
            if not correct:
                break
            total += 1
    return 1 + total / len(chains)


def test_est_accept_len_equals_a_plain_loop():
    """1 + sum_i full_acc_i is 1 + the mean count of leading correct drafts."""
    chains = _chains(random.Random(0), positions=50, steps=4)
    out = derive_metrics(_step_output(chains))
    assert out.metrics["est_accept_len"].dtype == torch.float32
    assert out.metrics["est_accept_len"].item() == pytest.approx(_plain_est(chains), rel=1e-6)
    assert int(out.weights["est_accept_len"]) == 50


def test_cond_acc_only_gives_the_product_of_conditional_acceptances():
    """An algorithm reporting only cond_acc_i gets 1 + sum_i prod_{j<=i} cond_acc_j."""
    metrics = {"cond_acc_0": torch.tensor(0.5), "cond_acc_1": torch.tensor(0.4)}
    value = est_accept_len(metrics)
    assert value is not None
    assert value.item() == pytest.approx(1 + 0.5 + 0.5 * 0.4)


def test_no_per_position_accuracies_means_no_estimate():
    """Algorithms outside the convention are left alone (and keep their own metrics)."""
    out = TrainingStepOutput(loss=torch.tensor(1.0), metrics={"acc": torch.tensor(0.5)})
    assert derive_metrics(out) is out


def test_the_core_replaces_an_algorithms_own_estimate():
    """est_accept_len is the core's name: a plugin's value is replaced, not averaged in."""
    out = _step_output([[True, False]])
    out.metrics["est_accept_len"] = torch.tensor(9.0)
    assert derive_metrics(out).metrics["est_accept_len"].item() == 2.0
    assert out.metrics["est_accept_len"].item() == 9.0  # the input is not changed


def test_micro_batches_combine_weighted_by_their_scored_positions():
    """Logged est_accept_len = the micro-batches' estimates weighted by position-0 counts."""
    rng = random.Random(1)
    batches = [_chains(rng, positions=n, steps=3) for n in (7, 30, 12)]
    sums = WeightedSums()
    for chains in batches:
        sums.add_output(_step_output(chains))
    logged = sums.averages()["est_accept_len"]
    expected = sum(_plain_est(c) * len(c) for c in batches) / sum(len(c) for c in batches)
    assert logged == pytest.approx(expected, rel=1e-6)
    # full_acc_i stays the exact global fraction, whatever the split.
    everything = [chain for chains in batches for chain in chains]
    whole = _step_output(everything)
    for s in range(3):
        assert sums.averages()[f"full_acc_{s}"] == pytest.approx(
            float(whole.metrics[f"full_acc_{s}"]), rel=1e-6
        )
