"""Checkpoints: atomic writes of everything a run needs to continue exactly where it stopped.

Layout of a run folder (``args.output_dir``)::

    checkpoints/step-N/            one checkpoint, written under a temporary name then renamed
        model/                     the draft in speculators format (config.json + safetensors)
        optimizer.pt               full (unsharded) optimizer state, keyed by parameter name
        scheduler.pt               learning-rate scheduler state
        rng/rank-00000.pt          torch / numpy / python (/ CUDA) RNG states, one file per process
        trainer_state.json         TrainerState: step, data position, best metric, log history
        callbacks.json             states of stateful callbacks, by state_key
        training_args.json         the run's TrainingArguments
    final/                         the trained draft in speculators format, ready for `vllm serve`
    metrics.jsonl                  one JSON record per log event (rank 0)

Only rank 0 writes; the other processes take part in gathering the sharded model and optimizer
states. Because each checkpoint appears under its final name only once complete, a run killed at
any moment leaves the previous checkpoints intact and the newest complete one is what
:func:`latest_checkpoint` finds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from speculators_core.fsutil import atomic_directory
from speculators_core.train.callbacks import TrainerState
from speculators_core.train.distributed import DistributedContext
from speculators_core.train.errors import ResumeError

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "FINAL_DIRNAME",
    "LoadedCheckpoint",
    "capture_rng",
    "checkpoint_path",
    "full_model_state_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "restore_rng",
    "save_checkpoint",
    "save_model_folder",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
FINAL_DIRNAME = "final"
MODEL_DIRNAME = "model"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_DIRNAME = "rng"
STATE_NAME = "trainer_state.json"
CALLBACKS_NAME = "callbacks.json"
ARGS_NAME = "training_args.json"

_STEP_RE = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------
# finding checkpoints
# ------------------------------------------------------------------------------------------


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``<output_dir>/checkpoints/step-<step>``."""
    return Path(output_dir) / CHECKPOINTS_DIRNAME / f"step-{step}"


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first.

    Temporary folders of interrupted writes (hidden names) are not listed.
    """
    root = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's torch, numpy, python (and CUDA) RNG states, as tensors and numbers.

    Stored without pickled objects so that it loads with ``torch.load(weights_only=True)``.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------
# model weights
# ------------------------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (a collective under FSDP; empty off rank 0)."""
    return get_model_state_dict(model, options=_FULL)  # type: ignore[return-value]


def save_model_folder(
    model: nn.Module, folder: str | os.PathLike[str], state_dict: dict[str, torch.Tensor]
) -> None:
    """Write ``state_dict`` as a speculators-format folder with ``model``'s config (rank 0 only)."""
    from transformers.utils import logging as hf_logging

    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise TypeError(f"{type(model).__name__} has no save_pretrained; train a SpeculatorModel")
    # transformers shows a "Writing model shards" bar per save; in a training run that is noise.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        save(folder, state_dict=state_dict)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            weights.update(load_file(folder / name))
        return weights
    raise ResumeError(
        f"checkpoint model folder '{folder}' has no model.safetensors; it is incomplete"
    )


def _ignored_on_save(model: nn.Module, key: str) -> bool:
    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    return any(re.search(p, key) for p in patterns)


def load_model_weights(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load a speculators folder's weights into ``model`` (sharded or not), checking names.

    Tensors that the model never saves (``_keys_to_ignore_on_save``: frozen verifier parts
    attached at build time) and tied aliases of saved tensors may be absent; anything else
    missing or unexpected is an error.
    """
    weights = _read_weights(Path(folder))
    expected = set(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise ResumeError(
            f"checkpoint '{folder}' has tensors this model lacks ({', '.join(unexpected[:5])}); "
            "it was written by a different model configuration"
        )
    missing = sorted(k for k in expected - set(weights) if not _ignored_on_save(model, k))
    tied = _tied_aliases(model, set(weights))
    missing = [k for k in missing if k not in tied]
    if missing:
        raise ResumeError(
            f"checkpoint '{folder}' lacks tensors {', '.join(missing[:5])}; it is incomplete or "
            "from a different model configuration"
        )
    set_model_state_dict(
        model,
        weights,  # type: ignore[arg-type]
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def _tied_aliases(model: nn.Module, present: set[str]) -> set[str]:
    """Parameter names that share their tensor with a name in ``present``."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    aliases: set[str] = set()
    for names in owners.values():
        if len(names) > 1 and any(n in present for n in names):
            aliases.update(names)
    return aliases


# ------------------------------------------------------------------------------------------
# save / load a checkpoint
# ------------------------------------------------------------------------------------------


def save_checkpoint(
    target: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    args_dict: dict[str, Any],
    callback_states: dict[str, dict[str, Any]],
    ctx: DistributedContext,
) -> Path:
    """Write a checkpoint to ``target`` atomically (every process must call this)."""
    target = Path(target)
    model_state = full_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng_states = ctx.all_gather_object(capture_rng())
    if ctx.is_main:
        with atomic_directory(target, overwrite=True) as tmp:
            save_model_folder(model, tmp / MODEL_DIRNAME, model_state)
            torch.save(optim_state, tmp / OPTIMIZER_NAME)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
            (tmp / RNG_DIRNAME).mkdir()
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / RNG_DIRNAME / f"rank-{rank:05d}.pt")
            state.save(tmp / STATE_NAME)
            (tmp / CALLBACKS_NAME).write_text(
                json.dumps(callback_states, indent=2, sort_keys=True) + "\n"
            )
            (tmp / ARGS_NAME).write_text(json.dumps(args_dict, indent=2, sort_keys=True) + "\n")
    ctx.barrier()
    return target


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the model, optimizer and scheduler states."""

    path: Path
    state: TrainerState
    callback_states: dict[str, dict[str, Any]]
    args: dict[str, Any]
    rng: dict[str, Any]


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistributedContext,
) -> LoadedCheckpoint:
    """Restore model, optimizer and scheduler from a checkpoint; return the rest.

    The RNG states are returned, not applied: the caller restores them last, after everything
    else that might draw random numbers.
    """
    path = Path(path)
    required = [STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, ARGS_NAME, MODEL_DIRNAME]
    absent = [name for name in required if not (path / name).exists()]
    if absent:
        raise ResumeError(
            f"checkpoint '{path}' lacks {', '.join(absent)}; it is not a complete training checkpoint"
        )
    state = TrainerState.load(path / STATE_NAME)
    if state.world_size != ctx.world_size:
        raise ResumeError(
            f"checkpoint '{path}' was written by {state.world_size} process(es) but this run has "
            f"{ctx.world_size}; resume with the same number of processes"
        )
    rng_file = path / RNG_DIRNAME / f"rank-{ctx.rank:05d}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"checkpoint '{path}' has no RNG state for rank {ctx.rank} ({rng_file})")
    load_model_weights(model, path / MODEL_DIRNAME)
    optim_state = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(torch.load(path / SCHEDULER_NAME, weights_only=True))
    return LoadedCheckpoint(
        path=path,
        state=state,
        callback_states=json.loads((path / CALLBACKS_NAME).read_text())
        if (path / CALLBACKS_NAME).is_file()
        else {},
        args=json.loads((path / ARGS_NAME).read_text()),
        rng=torch.load(rng_file, weights_only=True),
    )
