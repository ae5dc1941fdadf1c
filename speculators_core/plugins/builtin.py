"""The core's own hook implementations, registered exactly as a third-party plugin's would be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from speculators_core.plugins.hookspecs import hookimpl
from speculators_core.plugins.records import Objective, ProposalMethod


@hookimpl
def speculators_register_proposal_methods() -> Sequence[ProposalMethod]:
    """The greedy chain proposal (vLLM's default method)."""
    from speculators_core.proposals.chain import GREEDY

    return [GREEDY]


@hookimpl
def speculators_register_objectives() -> Sequence[Objective]:
    """The standard objectives (:mod:`speculators_core.objectives`)."""
    from speculators_core.objectives import BUILTIN_OBJECTIVES

    return [
        Objective(name=name, loss=loss, description=description)
        for name, (loss, description) in BUILTIN_OBJECTIVES.items()
    ]


@hookimpl
def speculators_training_callbacks(args: Any) -> Sequence[Any]:
    """The core's training behaviours: flow, checkpoints, early stopping, metrics, progress.

    They apply to runs of the core's ``Trainer`` (``args`` is a ``TrainingArguments``); for any
    other ``args`` the core contributes none.
    """
    # Imported here so that building a plugin host does not import the training engine.
    from speculators_core.train.arguments import TrainingArguments
    from speculators_core.train.builtin_callbacks import default_callbacks

    if not isinstance(args, TrainingArguments):
        return []
    return default_callbacks(args)
