"""The core's own training behaviours, written as ordinary callbacks.

They reach a run the way a third-party plugin's callbacks do: the core's built-in plugin
implements the ``speculators_training_callbacks`` hook with :func:`default_callbacks`.

* :class:`DefaultFlowCallback`: when to log and validate.
* :class:`CheckpointCallback`: when to save, and which checkpoints to keep.
* :class:`EarlyStoppingCallback`: stop when the validation metric stops improving.
* :class:`MetricsLoggerCallback`: a console line and a JSONL record per log event.
* :class:`TensorBoardCallback`: scalars for TensorBoard (when it is installed).
* :class:`ProgressCallback`: a tqdm progress bar.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from speculators_core.train.arguments import TrainingArguments
from speculators_core.train.callbacks import TrainerCallback, TrainerControl, TrainerState
from speculators_core.train.checkpoint import list_checkpoints
from speculators_core.train.errors import TrainingConfigError

__all__ = [
    "METRICS_FILENAME",
    "CheckpointCallback",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "MetricsLoggerCallback",
    "ProgressCallback",
    "TensorBoardCallback",
    "default_callbacks",
    "tensorboard_available",
]

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"


def _ends_mid_epoch(state: TrainerState) -> bool:
    """Whether this step is the run's last and its epoch has steps left (a ``max_steps`` cap)."""
    return state.global_step >= state.max_steps and state.step_in_epoch < state.steps_in_epoch


class DefaultFlowCallback(TrainerCallback):
    """Log every ``log_every`` steps and at the last step; validate per epoch and every ``eval_every``."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if state.global_step % args.log_every == 0 or state.global_step >= state.max_steps:
            control.should_log = True
        if args.eval_every is not None and state.global_step % args.eval_every == 0:
            control.should_evaluate = True
        if _ends_mid_epoch(state) and (args.eval_per_epoch or args.eval_every is not None):
            control.should_evaluate = True
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if args.eval_per_epoch:
            control.should_evaluate = True
        return control


class CheckpointCallback(TrainerCallback):
    """Save every ``save_every`` steps, at each epoch end, and when a step cap ends the run;
    keep the newest ``save_total_limit`` checkpoints plus the best one."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        epoch_done = state.step_in_epoch >= state.steps_in_epoch
        # When the epoch-end checkpoint of the same step follows, do not write it twice.
        if (
            args.save_every is not None
            and state.global_step % args.save_every == 0
            and not (epoch_done and args.save_per_epoch)
        ):
            control.should_save = True
        if _ends_mid_epoch(state):
            control.should_save = True
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if args.save_per_epoch:
            control.should_save = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or args.save_total_limit is None:
            return
        found = list_checkpoints(args.output_dir)
        keep = {path for _, path in found[-args.save_total_limit :]}
        if state.best_checkpoint is not None:
            keep.add(Path(args.output_dir) / state.best_checkpoint)
        for _, path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _improved(value: float, best: float | None, greater: bool, threshold: float) -> bool:
    if best is None:
        return True
    return value > best + threshold if greater else value < best - threshold


class EarlyStoppingCallback(TrainerCallback):
    """Stop training after ``patience`` validations without an improvement of the metric."""

    def __init__(
        self, metric: str, *, patience: int, greater_is_better: bool, threshold: float = 0.0
    ) -> None:
        self.metric = metric
        self.patience = patience
        self.greater_is_better = greater_is_better
        self.threshold = threshold
        self.best: float | None = None
        self.bad_evaluations = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evaluations = int(state["bad_evaluations"])

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        metrics: dict[str, float] = kwargs.get("metrics") or {}
        if self.metric not in metrics:
            raise TrainingConfigError(
                f"early stopping watches '{self.metric}', which validation did not report "
                f"(it reported: {', '.join(sorted(metrics)) or 'nothing'}); set metric_for_best to one of them"
            )
        value = float(metrics[self.metric])
        if _improved(value, self.best, self.greater_is_better, self.threshold):
            self.best = value
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
            if self.bad_evaluations >= self.patience:
                control.should_training_stop = True
        return control


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLoggerCallback(TrainerCallback):
    """Print one console line per log event and append it to ``<output>/metrics.jsonl`` (rank 0).

    On resume, records of steps after the checkpoint (written before the interruption, and about
    to be redone) are removed from the file first.
    """

    def __init__(self, *, console: bool = True, jsonl: bool = True) -> None:
        self.console = console
        self.jsonl = jsonl
        self._file: IO[str] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not (self.jsonl and state.is_world_process_zero):
            return
        path = Path(args.output_dir) / METRICS_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if state.global_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the interruption
                if record.get("step", 0) <= state.global_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        logs: dict[str, Any] = kwargs.get("logs") or {}
        record = {"step": state.global_step, "epoch": round(state.epoch_progress, 4), **logs}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.console:
            # Losses first, then the other metrics as given.
            keys = sorted(logs, key=lambda k: 0 if k in ("loss", "val_loss") else 1)
            shown = " | ".join(f"{k} {_format_value(logs[k])}" for k in keys)
            tqdm.write(
                f"step {state.global_step}/{state.max_steps} | epoch {state.epoch_progress:.2f} | {shown}"
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardCallback(TrainerCallback):
    """Write every logged number as a TensorBoard scalar under ``<output>/tensorboard`` (rank 0)."""

    def __init__(self) -> None:
        self._writer: Any = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(args.output_dir) / "tensorboard"))

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._writer is None:
            return
        for key, value in (kwargs.get("logs") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                tag = key.replace("val_", "val/", 1) if key.startswith("val_") else f"train/{key}"
                self._writer.add_scalar(tag, value, state.global_step)
        self._writer.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps (rank 0; hidden when output is not a terminal)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self._bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                disable=None,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logs = kwargs.get("logs") or {}
        if self._bar is not None and "loss" in logs:
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def default_callbacks(args: TrainingArguments) -> list[TrainerCallback]:
    """The core's callbacks for a run with ``args`` (what the built-in plugin's hook returns)."""
    callbacks: list[TrainerCallback] = [DefaultFlowCallback(), CheckpointCallback()]
    if args.early_stopping_patience is not None and args.metric_for_best:
        callbacks.append(
            EarlyStoppingCallback(
                args.metric_for_best,
                patience=args.early_stopping_patience,
                greater_is_better=args.greater_is_better,
                threshold=args.early_stopping_threshold,
            )
        )
    if args.console_log or args.jsonl_log:
        callbacks.append(MetricsLoggerCallback(console=args.console_log, jsonl=args.jsonl_log))
    if args.tensorboard is True and not tensorboard_available():
        raise TrainingConfigError(
            "tensorboard=true but the 'tensorboard' package is not installed; pip install tensorboard or unset it"
        )
    if args.tensorboard is not False and tensorboard_available():
        callbacks.append(TensorBoardCallback())
    if args.progress:
        callbacks.append(ProgressCallback())
    return callbacks
