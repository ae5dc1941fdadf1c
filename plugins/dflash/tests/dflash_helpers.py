"""Helpers of the DFlash plugin tests: captured verifier states and packed rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Aux ids for the 4-layer tiny verifiers (vLLM's default [2, N//2, N-3] needs N >= 7).
AUX_IDS = [1, 2, 3]
STATES = [*AUX_IDS, 4]


@torch.no_grad()
def capture_states(model: Any, input_ids: torch.Tensor, layer_ids: Sequence[int]) -> torch.Tensor:
    """Verifier states ``[L, len(layer_ids), H]`` of one sequence, vLLM semantics (id ``N`` is
    the last layer's output before the final norm)."""
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


def packed_row(
    model: Any, lengths: Sequence[int], *, seed: int, prompt: int = 3, pad: int = 0
) -> dict[str, torch.Tensor]:
    """One packed row of random documents (first ``prompt`` tokens unsupervised) and padding."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "states", "mask", "pos", "doc")}
    for doc, length in enumerate(lengths):
        ids = torch.randint(0, model.config.vocab_size, (length,), generator=generator)
        mask = torch.ones(length, dtype=torch.long)
        mask[:prompt] = 0
        parts["ids"].append(ids)
        parts["states"].append(capture_states(model, ids, STATES))
        parts["mask"].append(mask)
        parts["pos"].append(torch.arange(length))
        parts["doc"].append(torch.full((length,), doc))
    if pad:
        width = parts["states"][0].shape[-1]
        parts["ids"].append(torch.zeros(pad, dtype=torch.long))
        parts["states"].append(torch.zeros(pad, len(STATES), width))
        parts["mask"].append(torch.zeros(pad, dtype=torch.long))
        parts["pos"].append(torch.zeros(pad, dtype=torch.long))
        parts["doc"].append(torch.full((pad,), -1))
    return {
        "input_ids": torch.cat(parts["ids"])[None],
        "hidden_states": torch.cat(parts["states"])[None],
        "loss_mask": torch.cat(parts["mask"])[None],
        "position_ids": torch.cat(parts["pos"])[None],
        "document_ids": torch.cat(parts["doc"])[None],
    }
