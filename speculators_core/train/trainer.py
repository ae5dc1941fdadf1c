"""``Trainer``: the training loop. It knows no algorithm.

For each packed batch it calls the draft's ``training_step`` (the algorithm plugin's training
forward), which returns a loss and metrics; everything else (packing, optimisation, validation,
checkpoints, resume, distribution) is the same for every algorithm. The loop is written out
linearly in :meth:`Trainer.train`; see :mod:`speculators_core.train.callbacks` for the events
it fires, in order.

Loss and metrics are combined exactly over micro-batches and processes: each micro-batch's loss
is back-propagated multiplied by its weight (``TrainingStepOutput.weights["loss"]``, the number
of items it averages over, 1 when absent), and the accumulated gradient is divided by the total
weight of the global batch before clipping. Gradient accumulation and data parallelism therefore
give the gradient of one big batch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speculators_core.fsutil import atomic_directory
from speculators_core.train.arguments import PLAN_FIELDS, TrainingArguments
from speculators_core.train.callbacks import (
    CallbackHandler,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from speculators_core.train.checkpoint import (
    FINAL_DIRNAME,
    MODEL_DIRNAME,
    checkpoint_path,
    full_model_state_dict,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    save_model_folder,
)
from speculators_core.train.distributed import DistributedContext, shard_model
from speculators_core.train.errors import DataError, ResumeError, TrainingConfigError
from speculators_core.train.host_memory import return_freed_memory_to_os
from speculators_core.train.metrics import WeightedSums
from speculators_core.train.optim import build_optimizer, build_scheduler
from speculators_core.train.packing import (
    FeatureShape,
    Piece,
    RunPlan,
    SampleSource,
    collate_rows,
    split_indices,
)

if TYPE_CHECKING:
    from speculators_core.model import SpeculatorModel
    from speculators_core.plugins.host import PluginHost

__all__ = ["TrainOutput", "Trainer", "parameter_counts"]

logger = logging.getLogger(__name__)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts (shared tensors counted once)."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return total, trainable


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainOutput:
    """The result of :meth:`Trainer.train`."""

    state: TrainerState
    #: ``<output_dir>/final``: the trained draft in speculators format.
    final_dir: Path
    #: The last training and validation metrics logged.
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Trains a :class:`~speculators_core.model.SpeculatorModel` on packed samples.

    ``train_data`` is any :class:`~speculators_core.train.packing.SampleSource` (the shard store,
    the online source, an :class:`~speculators_core.train.packing.InMemorySource`). Without
    ``val_data``, ``args.val_fraction`` of ``train_data`` is held out for validation.

    Callbacks: those that plugins contribute through the ``speculators_training_callbacks`` hook
    (the core's built-ins among them), asked once here from ``host`` (default: the process-wide
    host), followed by ``callbacks``.

    Run it as a plain process or under ``torchrun``; with several processes each one builds the
    same draft and calls :meth:`train`, and the draft is sharded with FSDP2.
    """

    def __init__(
        self,
        model: SpeculatorModel,
        args: TrainingArguments,
        train_data: SampleSource,
        *,
        val_data: SampleSource | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        host: PluginHost | None = None,
        ctx: DistributedContext | None = None,
    ) -> None:
        args.validate()
        self.model = model
        self.args = args
        self.train_data = train_data
        self.val_data = val_data if val_data is not None else train_data
        self._owns_ctx = ctx is None
        self.ctx = ctx if ctx is not None else DistributedContext.from_env(args.device)
        if host is None:
            from speculators_core.plugins.host import get_host

            host = get_host()
        # Asked once, at start-up; never inside the step loop.
        self.handler = CallbackHandler([*host.training_callbacks(args=args), *callbacks])

        if len(train_data) == 0:
            raise DataError("the training data holds no samples; prepare data first")
        lengths = [int(train_data.num_tokens(i)) for i in range(len(train_data))]
        if val_data is None:
            train_idx, val_idx = split_indices(len(train_data), args.val_fraction, args.seed)
            val_lengths = None
        else:
            train_idx, val_idx = list(range(len(train_data))), list(range(len(val_data)))
            val_lengths = [int(val_data.num_tokens(i)) for i in range(len(val_data))]
        self.plan = RunPlan(
            lengths,
            train_idx,
            val_idx,
            val_lengths=val_lengths,
            seq_len=args.seq_len,
            micro_batch_rows=args.micro_batch_rows,
            grad_accum_steps=args.grad_accum_steps,
            world_size=self.ctx.world_size,
            seed=args.seed,
            shuffle=args.shuffle,
            overlong=args.overlong,
        )
        self.feature = self._feature_shape()
        self.use_bf16 = self._resolve_bf16()
        self.use_fsdp = self.args.fsdp if self.args.fsdp is not None else self.ctx.distributed
        if self.use_fsdp and not self.ctx.distributed:
            raise TrainingConfigError(
                "fsdp=true needs several processes; launch with torchrun --nproc_per_node N or unset fsdp"
            )

    # ------------------------------------------------------------------ set-up helpers

    def _feature_shape(self) -> FeatureShape:
        first = self.train_data[self.plan.train_indices[0] if self.plan.train_indices else 0]
        states = torch.as_tensor(first["hidden_states"])
        if states.dim() != 3:
            raise DataError(
                f"sample hidden_states have shape {tuple(states.shape)}; expected [L, n, H]"
            )
        feature = FeatureShape(int(states.shape[1]), int(states.shape[2]), states.dtype)
        try:
            layer_ids = list(self.model.hidden_state_spec().layer_ids)
        except NotImplementedError:
            return feature
        if len(layer_ids) != feature.num_states:
            raise DataError(
                f"the data has {feature.num_states} hidden state(s) per token but this draft needs "
                f"{len(layer_ids)} (layer ids {layer_ids}); capture data with the draft's spec"
            )
        return feature

    def _resolve_bf16(self) -> bool:
        if self.args.bf16 is not None:
            return self.args.bf16
        # On CPUs without native bf16 matmuls autocast is slower than fp32; use it on GPUs only.
        return self.ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def _autocast(self) -> AbstractContextManager[Any]:
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)

    def _batch(
        self, rows: Sequence[Sequence[Piece]], source: SampleSource
    ) -> dict[str, torch.Tensor]:
        # Hidden-state noise is the algorithm's (its training_step, in training mode only): the
        # batch holds the states exactly as stored.
        batch = collate_rows(rows, source, self.args.seq_len, self.feature)
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _check_resume_args(self, saved: dict[str, Any], path: Path) -> None:
        current = self.args.to_dict()
        changed = [k for k in PLAN_FIELDS if k in saved and saved[k] != current[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            raise ResumeError(
                f"cannot resume '{path}' exactly: {diffs}; use the checkpoint's values or start a new run"
            )

    def total_steps(self) -> int:
        """Optimizer steps this run will take (all epochs, capped by ``max_steps``)."""
        total = self.plan.total_steps(self.args.num_epochs)
        return min(total, self.args.max_steps) if self.args.max_steps is not None else total

    def describe(self) -> dict[str, Any]:
        """The data plan and placement of this run, as a JSON-ready dict (for ``--dry-run``)."""
        plan, args = self.plan, self.args
        return {
            "train_samples": len(plan.train_indices),
            "val_samples": len(plan.val_indices),
            "train_tokens": sum(plan.lengths[i] for i in plan.train_indices),
            "rows_per_epoch": len(plan.epoch_rows(0)),
            "steps_per_epoch": plan.steps_in_epoch(0),
            "total_steps": self.total_steps(),
            "global_batch_rows": args.micro_batch_rows
            * args.grad_accum_steps
            * self.ctx.world_size,
            "processes": self.ctx.world_size,
            "hidden_states": [self.feature.num_states, self.feature.hidden_size],
            "hidden_dtype": str(self.feature.dtype).removeprefix("torch."),
            "device": str(self.ctx.device),
            "bf16": self.use_bf16,
            "fsdp": self.use_fsdp,
        }

    # ------------------------------------------------------------------ the loop

    def train(self, resume_from: str | os.PathLike[str] | None = None) -> TrainOutput:
        """Run training (or continue the checkpoint ``resume_from``); return the final state.

        ``resume_from="latest"`` continues from the newest checkpoint in ``args.output_dir``
        (and starts fresh when there is none).
        """
        try:
            return self._train(resume_from)
        finally:
            if self._owns_ctx:
                self.ctx.close()

    def _train(self, resume_from: str | os.PathLike[str] | None) -> TrainOutput:
        args, ctx, plan, model = self.args, self.ctx, self.plan, self.model
        _seed_everything(args.seed + ctx.rank)
        if ctx.device.type == "cpu":
            return_freed_memory_to_os()  # the step's activations go back to the system
        if not self.use_fsdp:  # FSDP2 shards keep one dtype per group
            saved = model.compact_frozen_parts()
            if saved:
                logger.info("frozen verifier copies stored in bf16: %.0f MB less", saved / 2**20)
        model.to(ctx.device)  # type: ignore[arg-type]  # transformers' wrapped .to
        ctx.broadcast_module(model)
        if self.use_fsdp:
            shard_model(model, ctx, methods=("training_step",))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, args)
        total_steps = self.total_steps()
        scheduler = build_scheduler(optimizer, args, total_steps)
        state = TrainerState(
            max_steps=total_steps,
            num_epochs=args.num_epochs,
            train_samples=len(plan.train_indices),
            val_samples=len(plan.val_indices),
            world_size=ctx.world_size,
            is_world_process_zero=ctx.is_main,
        )
        control = TrainerControl()
        handler = self.handler
        common = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}

        # ---- resume: model, optimizer, scheduler, data position, callbacks, then RNG last.
        if resume_from is not None and str(resume_from) == "latest":
            resume_from = latest_checkpoint(args.output_dir)
        if resume_from is not None:
            path = Path(resume_from)
            loaded = load_checkpoint(
                path, model=model, optimizer=optimizer, scheduler=scheduler, ctx=ctx
            )
            self._check_resume_args(loaded.args, path)
            state = loaded.state
            state.max_steps, state.num_epochs = total_steps, args.num_epochs
            state.is_world_process_zero = ctx.is_main
            handler.load_state_dicts(loaded.callback_states)
            restore_rng(loaded.rng)
            logger.info("resumed from %s at step %d", path, state.global_step)

        model.train()
        window = WeightedSums()  # training metrics since the last log
        window_tokens, window_seconds, grad_norm = 0, 0.0, 0.0
        last_eval: tuple[int, dict[str, float]] | None = None
        last_logs: dict[str, float] = {}

        control = handler.call("on_train_begin", args, state, control, **common)
        for epoch in range(state.epoch, args.num_epochs):
            if state.global_step >= state.max_steps:
                break
            state.steps_in_epoch = plan.steps_in_epoch(epoch)
            control.should_epoch_stop = False
            control = handler.call("on_epoch_begin", args, state, control, **common)
            while (
                state.step_in_epoch < state.steps_in_epoch and state.global_step < state.max_steps
            ):
                step_started = time.perf_counter()
                control = handler.call("on_step_begin", args, state, control, **common)

                # ---- forward + backward of each micro-batch, loss scaled by its weight.
                step_sums = WeightedSums()
                micro_batches = plan.step_micro_batches(epoch, state.step_in_epoch, ctx.rank)
                for i, rows in enumerate(micro_batches):
                    batch = self._batch(rows, self.train_data)
                    if self.use_fsdp:
                        model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # type: ignore[operator]
                    with self._autocast():
                        out = model.training_step(batch)
                    (out.loss * _loss_weight(out)).backward()
                    step_sums.add_output(out)
                step_sums = step_sums.all_reduce(ctx)

                # ---- gradient of the whole global batch: divide by its total loss weight.
                total_weight = step_sums.weights.get("loss", 0.0)
                # FSDP averages gradients over processes; undo that (x world) before dividing.
                scale = ctx.world_size / total_weight if total_weight > 0 else 0.0
                for param in trainable:
                    if param.grad is not None:
                        param.grad.mul_(scale)
                norm = torch.nn.utils.clip_grad_norm_(
                    trainable, args.max_grad_norm if args.max_grad_norm is not None else math.inf
                )
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                control = handler.call(
                    "on_pre_optimizer_step", args, state, control, grad_norm=grad_norm, **common
                )
                optimizer.step()
                scheduler.step()
                control = handler.call("on_optimizer_step", args, state, control, **common)
                optimizer.zero_grad(set_to_none=True)

                tokens = plan.step_tokens(epoch, state.step_in_epoch)
                state.global_step += 1
                state.step_in_epoch += 1
                state.tokens_seen += tokens
                window.merge(step_sums)
                window_tokens += tokens
                step_seconds = time.perf_counter() - step_started
                window_seconds += step_seconds
                state.train_seconds += step_seconds
                control = handler.call("on_step_end", args, state, control, **common)

                if control.should_log:
                    control.should_log = False
                    logs = window.averages()
                    logs["lr"] = float(scheduler.get_last_lr()[0])
                    logs["grad_norm"] = grad_norm
                    logs["tokens_per_s"] = (
                        window_tokens / window_seconds if window_seconds > 0 else 0.0
                    )
                    logs["train_seconds"] = state.train_seconds
                    state.log_history.append({"step": state.global_step, **logs})
                    last_logs.update(logs)
                    window, window_tokens, window_seconds = WeightedSums(), 0, 0.0
                    control = handler.call("on_log", args, state, control, logs=logs, **common)
                if control.should_evaluate:
                    control, last_eval = self._evaluate(state, control, common)
                    if last_eval is not None:
                        last_logs.update(last_eval[1])
                if control.should_save:
                    control = self._save(state, control, common, last_eval, optimizer, scheduler)
                if control.should_epoch_stop or control.should_training_stop:
                    break

            stopped_inside = state.step_in_epoch < state.steps_in_epoch
            if control.should_training_stop or (stopped_inside and not control.should_epoch_stop):
                break  # stopped early, or the step cap ended the run inside this epoch
            # ---- the epoch ran to its end (or a callback ended it with should_epoch_stop).
            state.epoch = epoch + 1
            state.step_in_epoch = 0
            control = handler.call("on_epoch_end", args, state, control, **common)
            if control.should_evaluate:
                control, last_eval = self._evaluate(state, control, common)
                if last_eval is not None:
                    last_logs.update(last_eval[1])
            if control.should_save:
                control = self._save(state, control, common, last_eval, optimizer, scheduler)
            if control.should_training_stop:
                break

        final_dir = self._save_final(state)
        control = handler.call("on_train_end", args, state, control, final_dir=final_dir, **common)
        return TrainOutput(state=state, final_dir=final_dir, metrics=last_logs)

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def _evaluate(
        self, state: TrainerState, control: TrainerControl, common: dict[str, Any]
    ) -> tuple[TrainerControl, tuple[int, dict[str, float]] | None]:
        """Validate on the held-out rows; fire ``on_log`` and ``on_evaluate`` with ``val_*`` metrics."""
        control.should_evaluate = False
        micro_batches = self.plan.val_micro_batches(self.ctx.rank)
        if not micro_batches:
            return control, None
        model = self.model
        model.eval()
        sums = WeightedSums()
        for rows in micro_batches:
            batch = self._batch(rows, self.val_data)
            with self._autocast():
                sums.add_output(model.training_step(batch))
        model.train()
        metrics = sums.all_reduce(self.ctx).averages(prefix="val_")
        best_key = self.args.metric_for_best
        if best_key and best_key in metrics:
            value = metrics[best_key]
            if _better(value, state.best_metric, self.args.greater_is_better):
                state.best_metric, state.best_step = value, state.global_step
        state.log_history.append({"step": state.global_step, **metrics})
        control = self.handler.call(
            "on_log", self.args, state, control, logs=dict(metrics), **common
        )
        control = self.handler.call(
            "on_evaluate", self.args, state, control, metrics=dict(metrics), **common
        )
        return control, (state.global_step, metrics)

    # ------------------------------------------------------------------ saving

    def _save(
        self,
        state: TrainerState,
        control: TrainerControl,
        common: dict[str, Any],
        last_eval: tuple[int, dict[str, float]] | None,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> TrainerControl:
        control.should_save = False
        path = checkpoint_path(self.args.output_dir, state.global_step)
        key = self.args.metric_for_best
        if (
            key
            and last_eval is not None
            and last_eval[0] == state.global_step
            and key in last_eval[1]
        ):
            value = last_eval[1][key]
            if _better(value, state.best_checkpoint_metric, self.args.greater_is_better):
                relative = path.relative_to(self.args.output_dir).as_posix()
                state.best_checkpoint, state.best_checkpoint_metric = relative, value
        save_checkpoint(
            path,
            model=self.model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            args_dict=self.args.to_dict(),
            callback_states=self.handler.state_dicts(),
            ctx=self.ctx,
        )
        return self.handler.call(
            "on_save", self.args, state, control, checkpoint_dir=path, **common
        )

    def _save_final(self, state: TrainerState) -> Path:
        """Write ``<output_dir>/final`` (the last weights, or the best checkpoint's)."""
        final_dir = Path(self.args.output_dir) / FINAL_DIRNAME
        best = Path(self.args.output_dir) / state.best_checkpoint if state.best_checkpoint else None
        if self.args.final_weights == "best" and best is not None and best.is_dir():
            if self.ctx.is_main:
                with atomic_directory(final_dir, overwrite=True) as tmp:
                    shutil.copytree(best / MODEL_DIRNAME, tmp, dirs_exist_ok=True)
        else:
            if self.args.final_weights == "best":
                logger.warning(
                    "no checkpoint with a validation metric was saved; final/ holds the last weights"
                )
            weights = full_model_state_dict(self.model)
            if self.ctx.is_main:
                save_model_folder(self.model, final_dir, weights)
        self.ctx.barrier()
        return final_dir


def _loss_weight(out: Any) -> Any:
    weight = out.weights.get("loss")
    if weight is None:
        return 1.0
    return weight.detach().to(out.loss.dtype) if torch.is_tensor(weight) else float(weight)


def _better(value: float, best: float | None, greater: bool) -> bool:
    if best is None:
        return True
    return value > best if greater else value < best
