"""``TrainingArguments``: every knob of a training run, in one typed, JSON-serialisable record.

The same record is what the CLI resolves from flags and config files, what plugins receive in
the ``speculators_training_callbacks`` hook, what callbacks read, and what each checkpoint stores
(``training_args.json``). Each field's ``help`` is also the CLI's ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from speculators_core.train.errors import TrainingConfigError

__all__ = ["PLAN_FIELDS", "TrainingArguments"]

SchedulerName = Literal["linear", "cosine", "constant"]
OverlongPolicy = Literal["split", "truncate", "drop"]
FinalWeights = Literal["last", "best"]

#: Fields that decide which rows each step trains on. A run can only be resumed exactly with
#: the same values (the checkpoint's data position would point elsewhere otherwise).
PLAN_FIELDS: tuple[str, ...] = (
    "seq_len",
    "micro_batch_rows",
    "grad_accum_steps",
    "seed",
    "shuffle",
    "overlong",
    "val_fraction",
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainingArguments:
    """The resolved arguments of one training run (see each field's help)."""

    output_dir: str = field(
        default="output",
        metadata=_help(
            "Run folder: checkpoints/step-N/, metrics.jsonl, final/ (the speculators-format model)."
        ),
    )
    # ---------------------------------------------------------------- length of the run
    num_epochs: int = field(default=3, metadata=_help("Passes over the training split."))
    max_steps: int | None = field(
        default=None,
        metadata=_help("Stop after this many optimizer steps (default: run all epochs)."),
    )
    # ---------------------------------------------------------------- batches
    seq_len: int = field(
        default=2048,
        metadata=_help(
            "Length T of a packed row: samples are packed one after another into rows of T tokens."
        ),
    )
    micro_batch_rows: int = field(
        default=1, metadata=_help("Rows per micro-batch on each process.")
    )
    grad_accum_steps: int = field(
        default=1,
        metadata=_help(
            "Micro-batches per optimizer step on each process; the global batch is "
            "micro_batch_rows x grad_accum_steps x processes rows."
        ),
    )
    overlong: OverlongPolicy = field(
        default="split",
        metadata=_help(
            "Samples longer than seq_len: 'split' into seq_len-token pieces (positions continue, "
            "each piece is its own document), 'truncate' to the first seq_len tokens, or 'drop'."
        ),
    )
    shuffle: bool = field(
        default=True, metadata=_help("Shuffle samples (and packed rows) anew each epoch.")
    )
    val_fraction: float = field(
        default=0.05,
        metadata=_help(
            "Fraction of the samples held out for validation (a fixed, seeded split; 0 = none)."
        ),
    )
    hidden_state_noise: float = field(
        default=0.0,
        metadata=_help(
            "Removed (only 0 is accepted, so older run configs still load): hidden-state noise "
            "is the algorithm's own option, --algo-opt noise_std=X (eagle3's default: 0.05)."
        ),
    )
    # ---------------------------------------------------------------- optimisation
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "A torch.optim class by name, case-insensitive: adamw, adam, sgd, ...; or muon (Muon "
            "on hidden weight matrices, AdamW on embeddings, LM head, norms and biases)."
        ),
    )
    optimizer_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help('Extra keyword arguments for the optimizer, e.g. {"betas": [0.9, 0.95]}.'),
    )
    learning_rate: float = field(default=1e-4, metadata=_help("Peak learning rate."))
    weight_decay: float = field(
        default=0.01,
        metadata=_help("Weight decay of matrices (tensors with 2+ dims); vectors get none."),
    )
    lr_scheduler: SchedulerName = field(
        default="linear",
        metadata=_help("Decay after warm-up: linear or cosine to min_lr_ratio, or constant."),
    )
    warmup_steps: int | None = field(
        default=None, metadata=_help("Linear warm-up steps (default: warmup_ratio of the run).")
    )
    warmup_ratio: float = field(
        default=0.01,
        metadata=_help("Warm-up as a fraction of all steps, when warmup_steps is unset."),
    )
    min_lr_ratio: float = field(
        default=0.0, metadata=_help("Final learning rate as a fraction of the peak.")
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("Clip the global gradient norm to this (unset = no clipping).")
    )
    bf16: bool | None = field(
        default=None,
        metadata=_help(
            "bf16 autocast: default on for GPUs that support it, off on CPUs (where it is "
            "usually slower); true/false forces it."
        ),
    )
    seed: int = field(default=0, metadata=_help("Seed of the data order, the split and all RNGs."))
    # ---------------------------------------------------------------- logging, validation
    log_every: int = field(default=10, metadata=_help("Log training metrics every N steps."))
    eval_every: int | None = field(
        default=None,
        metadata=_help("Also validate every N steps (validation runs per epoch anyway)."),
    )
    eval_per_epoch: bool = field(default=True, metadata=_help("Validate at the end of each epoch."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar (on terminals)."))
    console_log: bool = field(
        default=True, metadata=_help("Print a metrics line at each log step.")
    )
    jsonl_log: bool = field(
        default=True, metadata=_help("Append metrics to <output>/metrics.jsonl.")
    )
    tensorboard: bool | None = field(
        default=None,
        metadata=_help(
            "Write TensorBoard events to <output>/tensorboard (default: when installed)."
        ),
    )
    # ---------------------------------------------------------------- checkpoints
    save_every: int | None = field(default=None, metadata=_help("Save a checkpoint every N steps."))
    save_per_epoch: bool = field(
        default=True, metadata=_help("Save a checkpoint at each epoch end.")
    )
    save_total_limit: int | None = field(
        default=2,
        metadata=_help("Keep the last K checkpoints (plus the best one); unset keeps all."),
    )
    metric_for_best: str | None = field(
        default="val_loss",
        metadata=_help("Validation metric that picks the best checkpoint (unset = none)."),
    )
    greater_is_better: bool = field(
        default=False, metadata=_help("Whether a larger metric_for_best is better.")
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata=_help("Stop after this many validations without improvement of metric_for_best."),
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata=_help("Minimum improvement of metric_for_best that counts.")
    )
    final_weights: FinalWeights = field(
        default="last",
        metadata=_help(
            "Which weights <output>/final holds: the last step's or the best checkpoint's."
        ),
    )
    # ---------------------------------------------------------------- placement
    device: str | None = field(
        default=None, metadata=_help("torch device (default: this rank's GPU if any, else cpu).")
    )
    fsdp: bool | None = field(
        default=None,
        metadata=_help("Shard the draft with FSDP2 (default: when more than one process runs)."),
    )

    # ------------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`TrainingConfigError` naming the first invalid field."""
        positive = ("num_epochs", "seq_len", "micro_batch_rows", "grad_accum_steps", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainingConfigError(
                    f"training argument {name}={value!r} must be an integer >= 1"
                )
        for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "warmup_steps"):
            value = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise TrainingConfigError(
                    f"training argument {name}={value!r} must be an integer >= {low} or unset"
                )
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise TrainingConfigError(
                f"training argument early_stopping_patience={self.early_stopping_patience!r} must be >= 1 or unset"
            )
        if self.seq_len < 3:
            raise TrainingConfigError(
                f"training argument seq_len={self.seq_len} is too short; use at least 3"
            )
        for name, lo, hi in (
            ("val_fraction", 0.0, 0.9),
            ("warmup_ratio", 0.0, 1.0),
            ("min_lr_ratio", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not lo <= float(value) <= hi:
                raise TrainingConfigError(
                    f"training argument {name}={value!r} must be between {lo} and {hi}"
                )
        if self.learning_rate <= 0:
            raise TrainingConfigError(
                f"training argument learning_rate={self.learning_rate!r} must be > 0"
            )
        if self.hidden_state_noise != 0:
            # The algorithm adds noise in its training_step (eagle3 by default); a second,
            # trainer-level noise would stack on top of it, so the old knob is refused.
            raise TrainingConfigError(
                f"training argument hidden_state_noise={self.hidden_state_noise!r} is no longer "
                "supported: hidden-state noise is the algorithm's own option, --algo-opt "
                "noise_std=X (eagle3: uniform U(-X, X) on the verifier states, default 0.05); "
                "pass 0 or drop it"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise TrainingConfigError(
                f"training argument max_grad_norm={self.max_grad_norm!r} must be > 0 or unset"
            )
        for name, value in (
            ("lr_scheduler", self.lr_scheduler),
            ("overlong", self.overlong),
            ("final_weights", self.final_weights),
        ):
            choices = typing.get_args(_FIELD_TYPES[name])
            if value not in choices:
                raise TrainingConfigError(
                    f"training argument {name}={value!r} must be one of {', '.join(choices)}"
                )
        if self.early_stopping_patience is not None and not self.metric_for_best:
            raise TrainingConfigError(
                "early_stopping_patience needs metric_for_best (the metric to watch); set both"
            )
        if not isinstance(self.optimizer_kwargs, dict):
            raise TrainingConfigError(
                f"training argument optimizer_kwargs={self.optimizer_kwargs!r} must be a mapping"
            )

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingArguments:
        """Build from a dict; keys may use dashes; an unknown key is an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise TrainingConfigError(
                    f"unknown training argument '{key}'; valid ones: {', '.join(sorted(names))}"
                )
            clean[name] = value
        return cls(**clean)

    def replace(self, **changes: Any) -> TrainingArguments:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainingArguments)
