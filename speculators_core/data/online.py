"""Online mode: hidden states computed inside the training data path, never written to disk.

:class:`OnlineHiddenStates` wraps prepared samples (``input_ids`` + ``loss_mask``) and yields
the same sample dicts a :class:`~speculators_core.data.store.ShardStore` holds, with
``hidden_states`` computed by the verifier as the samples are consumed (batched, in order).
It is a ``torch.utils.data.IterableDataset``; use it with ``num_workers=0`` (the verifier
lives in the process that iterates) or iterate it directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset

from speculators_core.data.capture import HiddenStateCapture
from speculators_core.features import HiddenStateSpec

__all__ = ["OnlineHiddenStates"]


class OnlineHiddenStates(IterableDataset[dict[str, torch.Tensor]]):
    """Yield ``{"input_ids", "loss_mask", "hidden_states"}`` with states computed on the fly.

    ``verifier`` is a model folder (loaded on first iteration) or an already loaded causal LM.
    ``samples`` is any iterable of dicts with ``input_ids`` and ``loss_mask`` (a
    :class:`~speculators_core.data.prepared.PreparedDataset`, a list, a generator). Consecutive
    samples are captured ``batch_size`` at a time and yielded in their original order.
    ``dtype`` casts the states (None keeps the verifier's compute dtype; pass ``torch.bfloat16``
    to train on exactly what an offline bf16 store would hold).
    """

    def __init__(
        self,
        verifier: str | os.PathLike[str] | nn.Module,
        spec: HiddenStateSpec,
        samples: Iterable[dict[str, torch.Tensor]],
        *,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        keep_on_device: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.verifier = verifier
        self.spec = spec
        self.samples = samples
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.compute_dtype = compute_dtype
        self.keep_on_device = keep_on_device
        self._capture: HiddenStateCapture | None = None

    @property
    def capture(self) -> HiddenStateCapture:
        """The capture helper (loads the verifier on first use)."""
        if self._capture is None:
            if isinstance(self.verifier, nn.Module):
                self._capture = HiddenStateCapture(self.verifier, self.spec)
            else:
                self._capture = HiddenStateCapture.from_verifier(
                    Path(self.verifier), self.spec, dtype=self.compute_dtype, device=self.device
                )
        return self._capture

    def __len__(self) -> int:
        if isinstance(self.samples, Sequence):
            return len(self.samples)
        raise TypeError("OnlineHiddenStates over a non-sized iterable has no length")

    def _flush(self, pending: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        states = self.capture.capture_batch(
            [s["input_ids"] for s in pending], keep_on_device=self.keep_on_device
        )
        for sample, st in zip(pending, states, strict=True):
            out: dict[str, Any] = dict(sample)
            out["hidden_states"] = st if self.dtype is None else st.to(self.dtype)
            yield out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict[str, torch.Tensor]] = []
        for sample in self.samples:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)
