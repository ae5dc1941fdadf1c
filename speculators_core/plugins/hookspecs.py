# mypy: disable-error-code="empty-body"
"""Every hook that speculators plugins can implement, in one place.

Hooks are called with keyword arguments only. An implementation may accept any subset of a
hook's arguments (pluggy passes only what it asks for) but never an argument the spec lacks:
such a plugin is refused when it is registered. Implement a hook with the
``speculators_core.hookimpl`` marker::

    from speculators_core import Algorithm, hookimpl

    @hookimpl
    def speculators_register_algorithms():
        return [Algorithm(name="eagle3", config_class=Eagle3Config, model_class=Eagle3Model)]

Expose the module (or any object holding hook functions) as an entry point in one of the groups
``speculators.algorithms``, ``speculators.converters`` or ``speculators.plugins``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from speculators_core.plugins.records import Algorithm, Converter, Objective, ProposalMethod

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

#: The pluggy project name shared by specs and implementations.
PROJECT_NAME = "speculators"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------
# Registration: asked once, when a plugin host is first used. Results of all plugins are
# concatenated; a name registered twice is an error naming both distributions.
# --------------------------------------------------------------------------------------------


@hookspec
def speculators_register_algorithms() -> Sequence[Algorithm]:
    """Return the speculator algorithms this plugin provides.

    Called once per plugin host, the first time algorithms are looked up (loading a checkpoint,
    ``speculators train``, building the config union). Return a list of
    :class:`~speculators_core.plugins.records.Algorithm` records; return ``[]`` if none.

    Example::

        @hookimpl
        def speculators_register_algorithms():
            return [Algorithm(name="eagle3", config_class=Eagle3Config, model_class=Eagle3Model)]
    """


@hookspec
def speculators_register_proposal_methods() -> Sequence[ProposalMethod]:
    """Return the token-proposal methods this plugin provides.

    Called once per plugin host, when ``proposal_methods`` entries of a config are validated.
    The core's own ``greedy`` method is registered through this hook. Return a list of
    :class:`~speculators_core.plugins.records.ProposalMethod` records.

    Example::

        @hookimpl
        def speculators_register_proposal_methods():
            return [ProposalMethod(name="greedy", config_class=GreedyTokenProposalConfig)]
    """


@hookspec
def speculators_register_converters() -> Sequence[Converter]:
    """Return the checkpoint converters this plugin provides.

    Called once per plugin host, by ``speculators convert`` (to detect the source format or to
    find the one named by ``--from``). Return a list of
    :class:`~speculators_core.plugins.records.Converter` records.

    Example::

        @hookimpl
        def speculators_register_converters():
            return [Converter(name="safeailab-eagle3", algorithm="eagle3",
                              detect=looks_like_safeailab_eagle3, convert=convert_safeailab_eagle3)]
    """


@hookspec
def speculators_register_objectives() -> Sequence[Objective]:
    """Return the training objectives this plugin provides.

    Called once per plugin host, when an objective is looked up by name (``--loss``). The core
    provides ``kl``, ``rkl``, ``jsd``, ``tv``, ``ce``, ``nla`` and ``lk``
    (:mod:`speculators_core.objectives`). ``loss(logits, target)`` takes the draft's logits
    ``[N, V]`` and the verifier's :class:`~speculators_core.objectives.TargetDistribution` at
    the same rows, and returns the per-position loss ``[N]`` in fp32.

    Example::

        @hookimpl
        def speculators_register_objectives():
            return [Objective(name="focal", loss=focal_loss, description="...")]
    """


# --------------------------------------------------------------------------------------------
# Training: asked once when a Trainer starts, never inside the step loop.
# --------------------------------------------------------------------------------------------


@hookspec
def speculators_training_callbacks(args: Any) -> Sequence[Any]:
    """Return training callbacks to add to a run.

    Called once when a :class:`~speculators_core.train.Trainer` is set up, with ``args`` (the
    run's resolved training arguments). Return a list of ``TrainerCallback`` instances (return
    ``[]`` to add none, for example when ``args`` says the feature is off). The core's progress,
    logging and checkpointing callbacks are contributed through this hook.

    Example::

        @hookimpl
        def speculators_training_callbacks(args):
            return [MyLossSpikeAlarm(threshold=10.0)] if args.report_to else []
    """
