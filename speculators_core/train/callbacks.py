"""Hooks into the training loop: ``TrainerState``, ``TrainerControl``, ``TrainerCallback``.

* :class:`TrainerState` is what has happened (steps, epoch, data position, best metric, log
  history). It is JSON and saved with every checkpoint.
* :class:`TrainerControl` is what a callback asks the loop to do next (log, validate, save, stop).
  It is the only thing the loop reads back from callbacks; callbacks never touch the trainer.
* :class:`TrainerCallback` has one no-op method per event. Subclass it and override what you need.

The loop, with every event in order (``[...]`` when the control flag asks for it)::

    on_train_begin
    for each epoch:
        on_epoch_begin
        for each optimizer step:
            on_step_begin
            forward + backward of each micro-batch
            on_pre_optimizer_step          # gradients ready and clipped
            on_optimizer_step              # parameters updated
            on_step_end
            [on_log]                       # control.should_log
            [on_log, on_evaluate]          # control.should_evaluate (validation metrics)
            [on_save]                      # control.should_save
        on_epoch_end                       # only when the epoch ran to its end
        [on_log, on_evaluate] [on_save]
    on_train_end                           # after <output>/final is written

Callbacks that keep state across a resume implement ``state_dict()`` (JSON-ready) and
``load_state_dict()``; the trainer stores it in each checkpoint under ``state_key``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import PluginError

if TYPE_CHECKING:
    from speculators_core.train.arguments import TrainingArguments

__all__ = [
    "EVENTS",
    "CallbackHandler",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
]

#: Every event a callback can receive.
EVENTS: tuple[str, ...] = (
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_evaluate",
    "on_save",
    "on_epoch_end",
    "on_train_end",
)


@dataclass
class TrainerState:
    """What has happened in a run so far; saved as ``trainer_state.json`` in each checkpoint.

    The data position is ``(epoch, step_in_epoch)``: the next step to run is step
    ``step_in_epoch`` of epoch ``epoch`` (both from 0). ``epoch`` counts completed epochs once an
    epoch has ended.
    """

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    steps_in_epoch: int = 0
    max_steps: int = 0
    num_epochs: int = 0
    #: Non-padding tokens trained on, over all processes.
    tokens_seen: int = 0
    #: Wall-clock seconds spent in training steps (validation and saving excluded), over resumes.
    train_seconds: float = 0.0
    train_samples: int = 0
    val_samples: int = 0
    #: Best value of ``args.metric_for_best`` seen in any validation, and its step.
    best_metric: float | None = None
    best_step: int | None = None
    #: The checkpoint with the best validation metric among those saved right after a
    #: validation (kept by checkpoint rotation), relative to the run folder
    #: (``checkpoints/step-N``), and that metric.
    best_checkpoint: str | None = None
    best_checkpoint_metric: float | None = None
    #: Every logged record (training and validation), oldest first.
    log_history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    #: True on the process that logs and writes files (rank 0); not a checkpointed fact.
    is_world_process_zero: bool = True

    @property
    def epoch_progress(self) -> float:
        """Completed epochs as a fraction (``1.5`` = half-way through the second epoch)."""
        if self.steps_in_epoch <= 0:
            return float(self.epoch)
        return self.epoch + self.step_in_epoch / self.steps_in_epoch

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (without the per-process ``is_world_process_zero``)."""
        data = dataclasses.asdict(self)
        data.pop("is_world_process_zero")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        """Inverse of :meth:`to_json`; unknown keys are ignored (newer writers)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as indented JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainerState:
        """Read a state written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class TrainerControl:
    """What callbacks ask the loop to do next; the only channel from callbacks to the loop.

    ``should_log``, ``should_evaluate`` and ``should_save`` are cleared once the loop has acted
    on them; ``should_epoch_stop`` at the start of each epoch; ``should_training_stop`` stays.
    """

    should_log: bool = False
    should_evaluate: bool = False
    should_save: bool = False
    should_epoch_stop: bool = False
    should_training_stop: bool = False


class TrainerCallback:
    """Base class of training callbacks: every event is a no-op until overridden.

    Each event receives ``(args, state, control, **kwargs)``. A callback steers the loop by
    setting flags on ``control`` (and may return it); it must not mutate ``state`` or the
    trainer. Keyword arguments by event: ``model``, ``optimizer`` and ``lr_scheduler`` always;
    ``grad_norm`` on ``on_pre_optimizer_step``; ``logs`` on ``on_log``; ``metrics`` on
    ``on_evaluate``; ``checkpoint_dir`` on ``on_save``; ``final_dir`` on ``on_train_end``.
    """

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint's ``callbacks.json``."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any] | None:
        """JSON-ready state to restore on resume; ``None`` for stateless callbacks."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called once before the first step (after a resume has been restored)."""
        return None

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called at the start of an epoch (also when resuming in the middle of one)."""
        return None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called before the micro-batches of an optimizer step."""
        return None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called when gradients are accumulated and clipped, before the optimizer step."""
        return None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called after the optimizer and scheduler step, before gradients are cleared."""
        return None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called at the end of an optimizer step (``state.global_step`` counts it)."""
        return None

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called with ``logs`` (training or validation metrics) to report."""
        return None

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called after validation, with its ``metrics`` (keys start with ``val_``)."""
        return None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called after a checkpoint was written to ``checkpoint_dir``."""
        return None

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called when an epoch ran to its end (``state.epoch`` already counts it)."""
        return None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Event called once at the end, after the final model was written to ``final_dir``."""
        return None


class CallbackHandler:
    """Calls every callback's method for an event, in order, and returns the resulting control."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        for cb in callbacks:
            if not isinstance(cb, TrainerCallback):
                raise PluginError(
                    f"training callback {cb!r} is a {type(cb).__name__}, not a TrainerCallback; "
                    "subclass speculators_core.train.TrainerCallback"
                )
        keys = [cb.state_key for cb in callbacks if cb.state_dict() is not None]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise PluginError(
                f"two stateful training callbacks share the state_key {duplicates[0]!r}; give each "
                "a distinct state_key"
            )
        self.callbacks: list[TrainerCallback] = list(callbacks)

    def call(
        self,
        event: str,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        """Dispatch ``event``; a callback's returned control replaces the current one."""
        for cb in self.callbacks:
            result = getattr(cb, event)(args, state, control, **kwargs)
            if result is not None:
                if not isinstance(result, TrainerControl):
                    raise PluginError(
                        f"training callback {type(cb).__name__}.{event} returned "
                        f"{type(result).__name__}; return a TrainerControl or None"
                    )
                control = result
        return control

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """States of the stateful callbacks, by ``state_key``."""
        states: dict[str, dict[str, Any]] = {}
        for cb in self.callbacks:
            data = cb.state_dict()
            if data is not None:
                states[cb.state_key] = data
        return states

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each stateful callback its saved state (callbacks new to this run start fresh)."""
        for cb in self.callbacks:
            if cb.state_key in states and cb.state_dict() is not None:
                cb.load_state_dict(states[cb.state_key])
