"""Plugin discovery (stevedore) and hook registry (pluggy)."""

from speculators_core.plugins.hookspecs import hookimpl, hookspec
from speculators_core.plugins.host import (
    ALL_GROUPS,
    COMMAND_GROUP,
    HOOK_GROUPS,
    EntryPointInfo,
    LoadFailure,
    PluginHost,
    PluginSettings,
    get_host,
    list_entry_points,
    reset_host,
)
from speculators_core.plugins.records import (
    Algorithm,
    Converter,
    Objective,
    ProposalMethod,
    ProposalServing,
    TrainingOption,
    VllmServing,
)

__all__ = [
    "ALL_GROUPS",
    "COMMAND_GROUP",
    "HOOK_GROUPS",
    "Algorithm",
    "Converter",
    "EntryPointInfo",
    "LoadFailure",
    "Objective",
    "PluginHost",
    "PluginSettings",
    "ProposalMethod",
    "ProposalServing",
    "TrainingOption",
    "VllmServing",
    "get_host",
    "hookimpl",
    "hookspec",
    "list_entry_points",
    "reset_host",
]
