"""Packing samples into fixed-length rows, and the data sources the trainer reads.

A *sample* is a dict ``{"input_ids": [L], "loss_mask": [L], "hidden_states": [L, n, Ht]}``
(one conversation as the verifier saw it). The trainer packs samples one after another into
rows of ``seq_len`` tokens and collates rows into the batch format of
:mod:`speculators_core.batch` (``position_ids`` restart at each sample, ``document_ids`` number
the samples of a row, padding has ``document_ids == -1``).

Packing is planned from token counts alone, before any sample is read: a plan is a list of rows,
each a list of :class:`Piece` (which tokens of which sample). Plans are a pure function of the
seed, the epoch and the lengths, which is what makes a resumed run see exactly the rows an
uninterrupted run would.

Samples longer than ``seq_len`` (the ``overlong`` policy):

* ``"split"`` (default): cut into consecutive pieces of at most ``seq_len`` tokens. Each piece is
  its own document in its row (the draft does not attend across pieces) but keeps its true
  positions (the second piece starts at position ``seq_len``); the hidden states already carry
  the full context, so no supervised token is lost.
* ``"truncate"``: keep the first ``seq_len`` tokens.
* ``"drop"``: skip the sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from speculators_core.batch import BATCH_KEYS
from speculators_core.train.errors import DataError

__all__ = [
    "SAMPLE_KEYS",
    "FeatureShape",
    "InMemorySource",
    "Piece",
    "RunPlan",
    "SampleSource",
    "collate_rows",
    "pack_rows",
    "pieces_of",
    "split_indices",
]

#: Keys every sample must have.
SAMPLE_KEYS: tuple[str, ...] = ("input_ids", "loss_mask", "hidden_states")

# First-fit looks for room in at most this many of the most recent open rows; a bounded window
# keeps planning linear in the number of samples while filling rows nearly as well.
_OPEN_ROWS = 64


@runtime_checkable
class SampleSource(Protocol):
    """What the trainer reads samples from: sized, indexable, with cheap token counts.

    The offline shard store and the online (verifier-in-process) source both satisfy it.
    ``num_tokens(i)`` must be cheap (it is called for every sample to plan the packing) and equal
    ``len(self[i]["input_ids"])``. A source may also define ``get_many(indices) -> list`` to
    produce several samples at once (the online source batches its verifier forward that way);
    the trainer uses it for the samples of each micro-batch when present.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...

    def num_tokens(self, index: int) -> int: ...


class InMemorySource:
    """A :class:`SampleSource` over a list of sample dicts (tests, small experiments)."""

    def __init__(self, samples: Sequence[Mapping[str, Any]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self.samples[index]

    def num_tokens(self, index: int) -> int:
        return len(self.samples[index]["input_ids"])


@dataclass(frozen=True)
class Piece:
    """Tokens ``start .. start+length`` of sample ``sample`` (an index into the source)."""

    sample: int
    start: int
    length: int


@dataclass(frozen=True)
class FeatureShape:
    """Shape and dtype of one token's hidden states (``[n, Ht]``), to build padding rows."""

    num_states: int
    hidden_size: int
    dtype: torch.dtype


def split_indices(num_samples: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded train/validation split of ``range(num_samples)``: ``(train, val)``.

    At least one sample is held out when ``val_fraction > 0`` and there are two or more samples;
    both lists are sorted.
    """
    if val_fraction <= 0 or num_samples < 2:
        return list(range(num_samples)), []
    n_val = min(num_samples - 1, max(1, round(num_samples * val_fraction)))
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_samples)
    val = sorted(int(i) for i in order[:n_val])
    train = sorted(int(i) for i in order[n_val:])
    return train, val


def pieces_of(sample: int, length: int, seq_len: int, overlong: str) -> list[Piece]:
    """The pieces a sample of ``length`` tokens contributes under the ``overlong`` policy."""
    if length <= 0:
        return []
    if length <= seq_len:
        return [Piece(sample, 0, length)]
    if overlong == "truncate":
        return [Piece(sample, 0, seq_len)]
    if overlong == "drop":
        return []
    return [Piece(sample, s, min(seq_len, length - s)) for s in range(0, length, seq_len)]


def pack_rows(
    samples: Sequence[int],
    lengths: Sequence[int],
    seq_len: int,
    overlong: str = "split",
) -> list[list[Piece]]:
    """Pack ``samples`` (in this order) into rows of at most ``seq_len`` tokens.

    ``lengths[k]`` is the token count of ``samples[k]``. Each piece goes into the first of the
    most recent open rows with room for it, else into a new row; rows come out in the order they
    were opened. Deterministic: the same inputs give the same plan.
    """
    rows: list[list[Piece]] = []
    free: list[int] = []  # free tokens per row
    open_rows: list[int] = []  # indices of rows that may still take a piece
    for sample, length in zip(samples, lengths, strict=True):
        for piece in pieces_of(sample, length, seq_len, overlong):
            target = next((r for r in open_rows if free[r] >= piece.length), None)
            if target is None:
                rows.append([])
                free.append(seq_len)
                target = len(rows) - 1
                open_rows.append(target)
                if len(open_rows) > _OPEN_ROWS:
                    open_rows.pop(0)
            rows[target].append(piece)
            free[target] -= piece.length
            if free[target] == 0:
                open_rows.remove(target)
    return rows


def _as_tensor(value: Any, name: str, index: int) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(
            f"sample {index}: '{name}' is not array-like ({err}); check the data source"
        ) from err


def _check_sample(
    sample: Mapping[str, Any], index: int, expected_len: int | None
) -> dict[str, torch.Tensor]:
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise DataError(
            f"sample {index} lacks {', '.join(missing)} (has {', '.join(sorted(sample))}); "
            f"a training sample needs {', '.join(SAMPLE_KEYS)}"
        )
    ids = _as_tensor(sample["input_ids"], "input_ids", index)
    mask = _as_tensor(sample["loss_mask"], "loss_mask", index)
    states = _as_tensor(sample["hidden_states"], "hidden_states", index)
    n = ids.shape[0] if ids.dim() == 1 else -1
    if ids.dim() != 1 or mask.shape != (n,) or states.dim() != 3 or states.shape[0] != n:
        raise DataError(
            f"sample {index} has input_ids {tuple(ids.shape)}, loss_mask {tuple(mask.shape)}, "
            f"hidden_states {tuple(states.shape)}; expected [L], [L] and [L, n, H]"
        )
    if expected_len is not None and n != expected_len:
        raise DataError(
            f"sample {index} has {n} tokens but its source reported {expected_len}; the data "
            "source's num_tokens() disagrees with its samples"
        )
    return {"input_ids": ids, "loss_mask": mask, "hidden_states": states}


def collate_rows(
    rows: Sequence[Sequence[Piece]],
    source: SampleSource,
    seq_len: int,
    feature: FeatureShape,
) -> dict[str, torch.Tensor]:
    """Read the samples of ``rows`` from ``source`` and build one packed batch.

    Returns the tensors of :mod:`speculators_core.batch` with ``B = len(rows)``, ``T = seq_len``;
    an empty row is all padding (``document_ids == -1``).
    """
    b = len(rows)
    input_ids = torch.zeros(b, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_len, dtype=torch.long)
    position_ids = torch.zeros(b, seq_len, dtype=torch.long)
    document_ids = torch.full((b, seq_len), -1, dtype=torch.long)
    hidden = torch.zeros(b, seq_len, feature.num_states, feature.hidden_size, dtype=feature.dtype)
    wanted = list(dict.fromkeys(piece.sample for row in rows for piece in row))
    get_many = getattr(source, "get_many", None)
    raw = get_many(wanted) if get_many is not None else [source[i] for i in wanted]
    cache = {
        i: _check_sample(sample, i, source.num_tokens(i))
        for i, sample in zip(wanted, raw, strict=True)
    }
    for r, row in enumerate(rows):
        offset = 0
        for doc, piece in enumerate(row):
            sample = cache[piece.sample]
            states = sample["hidden_states"]
            if states.shape[1:] != (feature.num_states, feature.hidden_size):
                raise DataError(
                    f"sample {piece.sample} has hidden states of shape [L, {states.shape[1]}, "
                    f"{states.shape[2]}] but the run uses [L, {feature.num_states}, "
                    f"{feature.hidden_size}]; all samples must come from the same capture"
                )
            end = offset + piece.length
            src = slice(piece.start, piece.start + piece.length)
            input_ids[r, offset:end] = sample["input_ids"][src]
            loss_mask[r, offset:end] = sample["loss_mask"][src]
            hidden[r, offset:end] = states[src]
            position_ids[r, offset:end] = torch.arange(piece.start, piece.start + piece.length)
            document_ids[r, offset:end] = doc
            offset = end
        if offset > seq_len:
            raise DataError(f"a packed row holds {offset} tokens, more than seq_len={seq_len}")
    batch = {
        "input_ids": input_ids,
        "hidden_states": hidden,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "document_ids": document_ids,
    }
    assert tuple(batch) == BATCH_KEYS
    return batch


class RunPlan:
    """Which rows every optimizer step of every epoch trains on, for every process.

    ``lengths[i]`` is the token count of training-source sample ``i`` (``val_lengths`` the same
    for the validation source, which defaults to the training source);
    ``train_indices``/``val_indices`` select the samples of each split.

    Epoch ``e`` shuffles the training samples with a generator seeded by ``(seed, e)``, packs
    them with :func:`pack_rows` and shuffles the rows. Rows are dealt out in global
    micro-batches of ``micro_batch_rows x world_size`` rows (process ``r`` takes the ``r``-th
    slice of ``micro_batch_rows``); ``grad_accum_steps`` global micro-batches make one step.
    The last micro-batch of an epoch is padded with empty rows and the last step may have fewer
    micro-batches, so every process runs the same number of forwards (FSDP needs that).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        train_indices: Sequence[int],
        val_indices: Sequence[int] = (),
        *,
        val_lengths: Sequence[int] | None = None,
        seq_len: int,
        micro_batch_rows: int,
        grad_accum_steps: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        overlong: str = "split",
    ) -> None:
        self.lengths = list(lengths)
        self.train_indices = list(train_indices)
        self.val_indices = list(val_indices)
        self.val_lengths = self.lengths if val_lengths is None else list(val_lengths)
        self.seq_len = seq_len
        self.micro_batch_rows = micro_batch_rows
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.overlong = overlong
        self._rows_cache: tuple[int, list[list[Piece]]] | None = None
        self._steps_cache: dict[int, int] = {}

    @property
    def global_micro_rows(self) -> int:
        """Rows per global micro-batch (all processes together)."""
        return self.micro_batch_rows * self.world_size

    def epoch_rows(self, epoch: int) -> list[list[Piece]]:
        """The packed training rows of ``epoch``, in training order."""
        if self._rows_cache is not None and self._rows_cache[0] == epoch:
            return self._rows_cache[1]
        order = list(self.train_indices)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:
            order = [order[i] for i in rng.permutation(len(order))]
        rows = pack_rows(order, [self.lengths[i] for i in order], self.seq_len, self.overlong)
        if self.shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        self._rows_cache = (epoch, rows)
        self._steps_cache[epoch] = self._count_steps(len(rows))
        return rows

    def _count_steps(self, num_rows: int) -> int:
        micro = math.ceil(num_rows / self.global_micro_rows)
        return math.ceil(micro / self.grad_accum_steps)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``."""
        if epoch not in self._steps_cache:
            self.epoch_rows(epoch)
        return self._steps_cache[epoch]

    def total_steps(self, num_epochs: int) -> int:
        """Optimizer steps in ``num_epochs`` epochs."""
        return sum(self.steps_in_epoch(e) for e in range(num_epochs))

    def _local(self, rows: Sequence[list[Piece]], micro: int, rank: int) -> list[list[Piece]]:
        start = micro * self.global_micro_rows + rank * self.micro_batch_rows
        mine = list(rows[start : start + self.micro_batch_rows])
        return mine + [[] for _ in range(self.micro_batch_rows - len(mine))]

    def step_micro_batches(self, epoch: int, step: int, rank: int) -> list[list[list[Piece]]]:
        """The micro-batches (each a list of ``micro_batch_rows`` rows) process ``rank`` runs in a step."""
        rows = self.epoch_rows(epoch)
        num_micro = math.ceil(len(rows) / self.global_micro_rows)
        first = step * self.grad_accum_steps
        last = min(first + self.grad_accum_steps, num_micro)
        return [self._local(rows, m, rank) for m in range(first, last)]

    def step_tokens(self, epoch: int, step: int) -> int:
        """Non-padding tokens in a step, over all processes."""
        rows = self.epoch_rows(epoch)
        per_step = self.global_micro_rows * self.grad_accum_steps
        return sum(p.length for row in rows[step * per_step : (step + 1) * per_step] for p in row)

    def val_micro_batches(self, rank: int) -> list[list[list[Piece]]]:
        """The validation micro-batches of process ``rank`` (rows in sample order, not shuffled)."""
        vals = self.val_indices
        rows = pack_rows(vals, [self.val_lengths[i] for i in vals], self.seq_len, self.overlong)
        num_micro = math.ceil(len(rows) / self.global_micro_rows)
        return [self._local(rows, m, rank) for m in range(num_micro)]
