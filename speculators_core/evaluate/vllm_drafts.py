"""Drafts fitted in seconds to known continuations, for the vLLM tests and benchmarks.

A draft that has seen the verifier's own greedy continuations of some prompts drafts them
well, so serving it on those prompts gives a high, reproducible acceptance: enough signal to
check that vLLM loads the draft correctly (aux layer ids, ``d2t``, norms), that its counters
agree with the reference decoder, and to measure a speed-up. It says nothing about how well a
draft generalises; real drafts come from ``speculators train``.

Works for any installed algorithm through the core contract (``hidden_state_spec`` and
``training_step``); nothing here imports a plugin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from speculators_core.data.capture import HiddenStateCapture
from speculators_core.errors import SpeculatorsError
from speculators_core.model import SpeculatorModel
from speculators_core.train.metrics import derive_metrics

__all__ = ["fit_batch", "fit_draft"]


def fit_batch(
    draft: SpeculatorModel,
    verifier: nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
) -> dict[str, torch.Tensor]:
    """One packed batch (see :mod:`speculators_core.batch`): a row per sequence.

    The loss mask covers each sequence's tokens after its first ``prompt_lengths[i]`` (the
    continuation); hidden states are captured from ``verifier`` as the draft's spec asks.
    """
    if len(sequences) != len(prompt_lengths) or not sequences:
        raise SpeculatorsError(
            f"need one prompt length per sequence (got {len(sequences)} sequences and "
            f"{len(prompt_lengths)} lengths)"
        )
    for seq, start in zip(sequences, prompt_lengths):
        if not 0 < start < len(seq):
            raise SpeculatorsError(
                f"prompt length {start} leaves no continuation in a sequence of {len(seq)} tokens"
            )
    capture = HiddenStateCapture(verifier, draft.hidden_state_spec())
    states = capture.capture_batch([torch.tensor(list(s), dtype=torch.long) for s in sequences])
    rows, longest = len(sequences), max(len(s) for s in sequences)
    num_states, width = states[0].shape[1], states[0].shape[2]
    batch = {
        "input_ids": torch.zeros(rows, longest, dtype=torch.long),
        "hidden_states": torch.zeros(rows, longest, num_states, width, dtype=states[0].dtype),
        "loss_mask": torch.zeros(rows, longest, dtype=torch.long),
        "position_ids": torch.zeros(rows, longest, dtype=torch.long),
        "document_ids": torch.full((rows, longest), -1, dtype=torch.long),  # -1: padding
    }
    for row, (seq, start, hidden) in enumerate(zip(sequences, prompt_lengths, states)):
        length = len(seq)
        batch["input_ids"][row, :length] = torch.tensor(list(seq), dtype=torch.long)
        batch["hidden_states"][row, :length] = hidden
        batch["loss_mask"][row, start:length] = 1
        batch["position_ids"][row, :length] = torch.arange(length)
        batch["document_ids"][row, :length] = 0
    return batch


def fit_draft(
    draft: SpeculatorModel,
    verifier: nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    steps: int,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``draft`` for ``steps`` AdamW steps on one batch of known continuations.

    ``sequences[i]`` is a prompt followed by the verifier's continuation of it (for example
    vLLM's greedy output) and ``prompt_lengths[i]`` the prompt's length. Returns the loss and
    metrics of every step; the draft is left in eval mode.
    """
    torch.manual_seed(seed)
    batch = fit_batch(draft, verifier, sequences, prompt_lengths)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    history: list[dict[str, float]] = []
    draft.train()
    for _ in tqdm(range(steps), desc="fitting draft", disable=not progress):
        out = derive_metrics(draft.training_step(batch))  # est_accept_len, as the trainer logs
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        history.append(
            {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}}
        )
    draft.eval()
    return history
