"""speculators-core: build, train, convert, evaluate and store speculative-decoding drafts.

The public API. Importing this package builds no plugin host and imports no plugin; it only
teaches transformers' ``AutoConfig`` to recognise speculators folders (see
:func:`speculators_core.loading.install_auto_config_loader`).
"""

from speculators_core.config import (
    GreedyTokenProposalConfig,
    SpeculatorModelConfig,
    SpeculatorsConfig,
    TokenProposalConfig,
    VerifierConfig,
    core_version,
    layer_config_from_dict,
)
from speculators_core.drafting import DraftProposal, DraftSession
from speculators_core.errors import (
    ConfigError,
    PluginError,
    SpeculatorsError,
    UnknownAlgorithmError,
)
from speculators_core.features import HiddenStateSpec
from speculators_core.lint import Finding, LintContext
from speculators_core.loading import (
    install_auto_config_loader,
    load_config,
    load_speculator,
    register_with_transformers,
    validation_context,
)
from speculators_core.model import SpeculatorModel, TrainingStepOutput
from speculators_core.plugins import (
    Algorithm,
    Converter,
    Objective,
    PluginHost,
    PluginSettings,
    ProposalMethod,
    ProposalServing,
    TrainingOption,
    VllmServing,
    get_host,
    hookimpl,
)
from speculators_core.vocab import build_vocab_mapping, check_vocab_mapping, draft_to_target

__version__ = core_version()

install_auto_config_loader()

__all__ = [
    "Algorithm",
    "ConfigError",
    "Converter",
    "DraftProposal",
    "DraftSession",
    "Finding",
    "GreedyTokenProposalConfig",
    "HiddenStateSpec",
    "LintContext",
    "Objective",
    "PluginError",
    "PluginHost",
    "PluginSettings",
    "ProposalMethod",
    "ProposalServing",
    "SpeculatorModel",
    "SpeculatorModelConfig",
    "SpeculatorsConfig",
    "SpeculatorsError",
    "TokenProposalConfig",
    "TrainingOption",
    "TrainingStepOutput",
    "UnknownAlgorithmError",
    "VerifierConfig",
    "VllmServing",
    "__version__",
    "build_vocab_mapping",
    "check_vocab_mapping",
    "draft_to_target",
    "get_host",
    "hookimpl",
    "layer_config_from_dict",
    "load_config",
    "load_speculator",
    "register_with_transformers",
    "validation_context",
]
