"""Helpers of the HASS plugin tests: captured verifier features, packed batches, from-scratch drafting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from speculators_hass import EagleDraftModel

from speculators_core import HiddenStateSpec
from speculators_core.data import HiddenStateCapture
from speculators_core.modeling import KVCache
from speculators_core.train import FeatureShape, InMemorySource, collate_rows, pack_rows


def final_spec(model: Any) -> HiddenStateSpec:
    """The spec an eagle draft uses: the verifier's final post-norm state."""
    return HiddenStateSpec(layer_ids=(model.config.num_hidden_layers,), post_norm_last=True)


def capture_features(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Final post-norm features ``[L, 1, H]`` of one sequence, through the core's capture."""
    return HiddenStateCapture(model, final_spec(model)).capture(input_ids)


def random_samples(
    model: Any, lengths: Sequence[int], *, seed: int, prompt_tokens: int = 3
) -> list[dict[str, torch.Tensor]]:
    """Random token sequences with their captured features; the first tokens are a prompt."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    capture = HiddenStateCapture(model, final_spec(model))
    samples = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=generator)
        mask = torch.ones(length, dtype=torch.long)
        mask[:prompt_tokens] = 0
        samples.append({"input_ids": ids, "hidden_states": capture.capture(ids), "loss_mask": mask})
    return samples


def pack(samples: Sequence[dict[str, torch.Tensor]], row_length: int) -> dict[str, torch.Tensor]:
    """Pack samples, in order, into rows of ``row_length`` with the core trainer's packing."""
    source = InMemorySource(samples)
    rows = pack_rows(range(len(samples)), [len(s["input_ids"]) for s in samples], row_length)
    states = samples[0]["hidden_states"]
    shape = FeatureShape(int(states.shape[1]), int(states.shape[2]), states.dtype)
    return collate_rows(rows, source, row_length, shape)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable weight away from its initial value (norms and biases included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


@torch.no_grad()
def draft_from_scratch(
    model: EagleDraftModel,
    tokens: torch.Tensor,
    features: torch.Tensor,
    positions: torch.Tensor,
    context_end: int,
    own_steps: int,
) -> torch.Tensor:
    """The draft's predicted feature after ``own_steps`` of its own predictions, from scratch.

    ``tokens`` ``[L]``, ``features`` ``[L, H]`` and ``positions`` ``[L]`` are one unshifted
    document. The draft first reads the true pairs ``(x_{j+1}, f_j)`` at positions ``p_j`` for
    ``j = 0 .. context_end`` (causal attention); then, ``own_steps`` times, index
    ``context_end + i`` reads the true token ``x_{context_end+i+1}`` (teacher forcing) with the
    feature the previous step predicted, attending to everything before it. Returns ``[H]``.
    """
    cache = KVCache(1)
    n = context_end + 1
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    predicted = model.decode(
        tokens[None, 1 : n + 1],
        features[None, :n],
        positions[None, :n],
        cache=cache,
        mask=causal,
        implementation="eager",
    )[:, -1:]
    for i in range(1, own_steps + 1):
        index = context_end + i
        predicted = model.decode(
            tokens[None, index + 1 : index + 2],
            predicted,
            positions[None, index : index + 1],
            cache=cache,
            mask=None,
            implementation="eager",
        )
    return predicted[0, 0]
