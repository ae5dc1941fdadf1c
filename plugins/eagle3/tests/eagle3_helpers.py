"""Helpers of the EAGLE-3 plugin tests: captured verifier states and packed batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Aux ids for the 4-layer tiny verifiers (vLLM's default [2, N//2, N-3] needs N >= 7).
AUX_IDS = [1, 2, 3]


@torch.no_grad()
def capture_states(model: Any, input_ids: torch.Tensor, layer_ids: Sequence[int]) -> torch.Tensor:
    """Verifier states ``[L, len(layer_ids), H]`` of one sequence ``[L]``, vLLM semantics.

    Id ``k < N`` is transformers' ``hidden_states[k]`` (the input of layer ``k``); id ``N`` is
    the last decoder layer's output *before* the final norm, taken with a forward hook because
    transformers returns the post-norm state as ``hidden_states[-1]``.
    """
    layers = model.model.layers
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]

    handle = layers[-1].register_forward_hook(keep)
    try:
        out = model(input_ids[None], output_hidden_states=True)
    finally:
        handle.remove()
    states = [
        out.hidden_states[k][0] if k < len(layers) else captured["last"][0] for k in layer_ids
    ]
    return torch.stack(states, dim=1)


def pack_rows(
    samples: Sequence[dict[str, torch.Tensor]], row_length: int
) -> dict[str, torch.Tensor]:
    """Pack samples (``input_ids [L]``, ``hidden_states [L, n, H]``, ``loss_mask [L]``) into rows.

    Samples go one after another into rows of ``row_length`` (a new row when the next does not
    fit); the rest of a row is padding (document id -1, zeros elsewhere).
    """
    rows: list[list[dict[str, torch.Tensor]]] = [[]]
    used = 0
    for sample in samples:
        n = sample["input_ids"].shape[0]
        assert n <= row_length, "sample longer than a row"
        if used + n > row_length:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += n
    n_states, width = samples[0]["hidden_states"].shape[1:]
    batch = {
        "input_ids": torch.zeros(len(rows), row_length, dtype=torch.long),
        "hidden_states": torch.zeros(len(rows), row_length, n_states, width),
        "loss_mask": torch.zeros(len(rows), row_length, dtype=torch.long),
        "position_ids": torch.zeros(len(rows), row_length, dtype=torch.long),
        "document_ids": torch.full((len(rows), row_length), -1, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        start = 0
        for d, sample in enumerate(row):
            n = sample["input_ids"].shape[0]
            batch["input_ids"][r, start : start + n] = sample["input_ids"]
            batch["hidden_states"][r, start : start + n] = sample["hidden_states"]
            batch["loss_mask"][r, start : start + n] = sample["loss_mask"]
            batch["position_ids"][r, start : start + n] = torch.arange(n)
            batch["document_ids"][r, start : start + n] = d
            start += n
    return batch


def random_samples(
    model: Any,
    layer_ids: Sequence[int],
    lengths: Sequence[int],
    *,
    seed: int,
    prompt_tokens: int = 3,
) -> list[dict[str, torch.Tensor]]:
    """Random token sequences with their captured verifier states; the first tokens are a prompt."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    samples = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=generator)
        mask = torch.ones(length, dtype=torch.long)
        mask[:prompt_tokens] = 0
        samples.append(
            {
                "input_ids": ids,
                "hidden_states": capture_states(model, ids, layer_ids),
                "loss_mask": mask,
            }
        )
    return samples
