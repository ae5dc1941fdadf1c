"""Training data sources besides the offline shard store: hidden states computed in-process.

The offline :class:`~speculators_core.data.store.ShardStore` already is a
:class:`~speculators_core.train.packing.SampleSource`. :class:`OnlineSource` is the online mode:
it wraps prepared samples (token ids and loss masks) and runs the verifier for the samples of
each micro-batch as the trainer asks for them, so no hidden state is ever written to disk.
Under ``torchrun`` each process runs its own verifier copy on its own rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from speculators_core.data.capture import HiddenStateCapture
    from speculators_core.features import HiddenStateSpec

__all__ = ["OnlineSource"]


class OnlineSource:
    """Samples whose ``hidden_states`` the verifier computes on demand (online mode).

    ``samples`` is a sized, indexable collection of ``{"input_ids", "loss_mask"}`` dicts (a
    :class:`~speculators_core.data.prepared.PreparedDataset`, a list); ``capture`` runs the
    verifier. ``dtype`` casts the captured states (``torch.bfloat16`` trains on exactly what a
    bf16 store would hold; ``None`` keeps the verifier's dtype).
    """

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]],
        capture: HiddenStateCapture,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.samples = samples
        self.capture = capture
        self.dtype = dtype

    @classmethod
    def from_verifier(
        cls,
        samples: Sequence[Mapping[str, Any]],
        verifier: str | os.PathLike[str],
        spec: HiddenStateSpec,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> OnlineSource:
        """Load the verifier folder and wrap ``samples``."""
        from speculators_core.data.capture import HiddenStateCapture

        return cls(
            samples, HiddenStateCapture.from_verifier(verifier, spec, device=device), dtype=dtype
        )

    def __len__(self) -> int:
        return len(self.samples)

    def num_tokens(self, index: int) -> int:
        """Length of sample ``index`` (no verifier forward)."""
        counter = getattr(self.samples, "num_tokens", None)
        if counter is not None:
            return int(counter(index))
        return len(self.samples[index]["input_ids"])

    def get_many(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Samples ``indices`` with hidden states, from one batched verifier forward."""
        base = [self.samples[i] for i in indices]
        ids = [torch.as_tensor(s["input_ids"]).long() for s in base]
        states = self.capture.capture_batch(ids)
        out = []
        for sample, token_ids, st in zip(base, ids, states, strict=True):
            out.append(
                {
                    "input_ids": token_ids,
                    "loss_mask": torch.as_tensor(sample["loss_mask"]).long(),
                    "hidden_states": st if self.dtype is None else st.to(self.dtype),
                }
            )
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.get_many([index])[0]
