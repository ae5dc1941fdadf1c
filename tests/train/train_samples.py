"""Synthetic training samples for the trainer's tests (importable as ``train_samples``)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def random_samples(
    n: int,
    *,
    hidden: int,
    vocab: int,
    seed: int = 0,
    min_len: int = 5,
    max_len: int = 40,
    num_states: int = 1,
    lengths: list[int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``n`` samples with seeded random tokens, loss masks and hidden states."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = (
            lengths[i]
            if lengths is not None
            else int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        )
        out.append(
            {
                "input_ids": torch.randint(0, vocab, (length,), generator=g),
                "loss_mask": (torch.rand(length, generator=g) > 0.3).long(),
                "hidden_states": torch.randn(length, num_states, hidden, generator=g),
            }
        )
    return out


@torch.no_grad()
def verifier_samples(
    verifier: str | os.PathLike[str], n: int, *, seed: int = 0, min_len: int = 8, max_len: int = 48
) -> list[dict[str, torch.Tensor]]:
    """``n`` samples whose hidden states are a tiny verifier's final pre-norm states.

    Tokens are random ids; the state at id N (the last decoder layer's output, before the final
    norm) is taken with a forward hook, as the fixture algorithm's spec asks.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(verifier)).eval()
    captured: list[torch.Tensor] = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    g = torch.Generator().manual_seed(seed)
    samples = []
    try:
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(0, model.config.vocab_size, (length,), generator=g)
            captured.clear()
            model(input_ids=ids[None])
            samples.append(
                {
                    "input_ids": ids,
                    "loss_mask": (torch.arange(length) >= length // 3).long(),
                    "hidden_states": captured[-1][0, :, None, :].clone(),
                }
            )
    finally:
        hook.remove()
    return samples


def synthetic_chats(n: int, seed: int) -> list[dict]:
    """``n`` short chats (1-2 turns) built from the tiny tokenizer's corpus."""
    from speculators_core.testing import TINY_CORPUS

    rng = random.Random(seed)
    sentences = sorted(set(TINY_CORPUS))
    chats = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": rng.choice(sentences)[:40]})
            turns.append({"role": "assistant", "content": rng.choice(sentences)})
        chats.append({"messages": turns})
    return chats
