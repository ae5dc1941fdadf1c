"""The training engine: a linear loop that trains any algorithm's draft on packed samples.

Public API::

    from speculators_core.train import Trainer, TrainingArguments, InMemorySource

    trainer = Trainer(draft, TrainingArguments(output_dir="run", num_epochs=2), store)
    result = trainer.train()            # or trainer.train(resume_from="latest")
    result.final_dir                    # run/final: speculators format, ready for `vllm serve`

Callbacks (:class:`TrainerCallback`) observe and steer the loop through
:class:`TrainerControl`; plugins contribute them with the ``speculators_training_callbacks``
hook. Launch under ``torchrun`` to train on several processes with FSDP2.
"""

from speculators_core.train.arguments import PLAN_FIELDS, TrainingArguments
from speculators_core.train.builtin_callbacks import (
    CheckpointCallback,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    MetricsLoggerCallback,
    ProgressCallback,
    TensorBoardCallback,
    default_callbacks,
)
from speculators_core.train.callbacks import (
    EVENTS,
    CallbackHandler,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from speculators_core.train.checkpoint import (
    CHECKPOINTS_DIRNAME,
    FINAL_DIRNAME,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
)
from speculators_core.train.distributed import DistributedContext, shard_model
from speculators_core.train.errors import DataError, ResumeError, TrainingConfigError
from speculators_core.train.packing import (
    FeatureShape,
    InMemorySource,
    Piece,
    RunPlan,
    SampleSource,
    collate_rows,
    pack_rows,
    split_indices,
)
from speculators_core.train.sources import OnlineSource
from speculators_core.train.trainer import Trainer, TrainOutput, parameter_counts

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "EVENTS",
    "FINAL_DIRNAME",
    "PLAN_FIELDS",
    "CallbackHandler",
    "CheckpointCallback",
    "DataError",
    "DefaultFlowCallback",
    "DistributedContext",
    "EarlyStoppingCallback",
    "FeatureShape",
    "InMemorySource",
    "MetricsLoggerCallback",
    "OnlineSource",
    "Piece",
    "ProgressCallback",
    "ResumeError",
    "RunPlan",
    "SampleSource",
    "TensorBoardCallback",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "TrainingConfigError",
    "checkpoint_path",
    "collate_rows",
    "default_callbacks",
    "latest_checkpoint",
    "list_checkpoints",
    "pack_rows",
    "parameter_counts",
    "shard_model",
    "split_indices",
]
