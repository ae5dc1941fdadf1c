"""Typed records that registration hooks return (instead of mutating global registries)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.options import TrainingOption

if TYPE_CHECKING:
    from speculators_core.config import SpeculatorModelConfig, TokenProposalConfig
    from speculators_core.lint import Finding, LintContext
    from speculators_core.model import SpeculatorModel

__all__ = [
    "AcceptFunction",
    "Algorithm",
    "ConvertFunction",
    "Converter",
    "DetectFunction",
    "DraftFunction",
    "LintFunction",
    "Objective",
    "ObjectiveLoss",
    "ProposalMethod",
    "ProposalServing",
    "RoundFunction",
    "TrainingOption",
    "VllmServing",
]

#: ``lint(context)`` returns (or yields) an algorithm's own findings about a speculator folder,
#: in order; see :class:`speculators_core.lint.LintContext`.
LintFunction = Callable[["LintContext"], Iterable["Finding"]]


@dataclass(frozen=True)
class VllmServing:
    """How vLLM serves an algorithm's drafts (``speculators serve``, ``eval --engine vllm``).

    * ``method``: vLLM's ``speculative_config["method"]`` for the draft (``"eagle3"``).
    * ``speculative_config``: extra keys merged into vLLM's ``speculative_config`` after
      ``method``, ``model`` and ``num_speculative_tokens`` (default: none), e.g.
      ``{"draft_tensor_parallel_size": 1}``; JSON values only, since ``serve`` writes them into
      ``--speculative-config``.
    * ``export``: empty when vLLM reads the speculators folder itself. Otherwise vLLM serves
      only an export of the folder, and this says how to make it (one imperative clause, e.g.
      ``"export it with 'speculators hass export-vllm DIR OUT' and serve OUT"``): ``serve``,
      ``eval --engine vllm`` and ``check`` refuse the speculators folder with it.
    """

    method: str
    speculative_config: Mapping[str, Any] = field(default_factory=dict)
    export: str = ""


@dataclass(frozen=True)
class Algorithm:
    """A speculator algorithm: the value of ``speculators_model_type`` and its classes.

    ``name`` is what checkpoints store as ``speculators_model_type`` and what users type
    (``speculators train --algorithm NAME``). ``config_class`` must declare
    ``speculators_model_type`` with that same name; ``model_class`` is the
    :class:`~speculators_core.model.SpeculatorModel` subclass that implements it. ``lint``
    (its ``speculators check`` rules) and ``vllm`` (how vLLM serves it) are optional.

    ``training_options`` lists the keyword options of ``model_class.from_verifier`` that users
    may set (``speculators train --algo-opt NAME=VALUE``, ``algo_options`` of a config file, the
    quickstart): the core refuses other names and converts each value to its declared type
    before ``from_verifier`` sees it. Left empty, options are passed through unchecked.
    """

    name: str
    config_class: type[SpeculatorModelConfig]
    model_class: type[SpeculatorModel]
    description: str = ""
    #: Filled in by the plugin host: "<distribution> <version>" of the plugin that registered it.
    provided_by: str = field(default="", compare=False)
    #: The options ``from_verifier`` accepts, with their types, defaults and help.
    training_options: Sequence[TrainingOption] = ()
    #: The algorithm's own ``speculators check`` rules, run after the core's generic checks;
    #: None: the generic checks only.
    lint: LintFunction | None = field(default=None, compare=False)
    #: How vLLM serves the algorithm; None: vLLM cannot serve it (``serve`` refuses).
    vllm: VllmServing | None = None


#: ``draft(session, k, temperature, generator) -> ChainDraft``: how the draft proposes ``k``
#: tokens through an algorithm's drafting session at ``temperature`` > 0, and the distributions
#: the tokens were drawn from (:mod:`speculators_core.proposals.chain`).
DraftFunction = Callable[..., Any]
#: ``accept(drafted [k], draft_probs [k, V], target_probs [k+1, V], generator) -> (accepted,
#: next_token)``: how the verifier accepts a drafted chain at temperature > 0; lossless rules
#: emit tokens distributed exactly as the verifier's own sampling.
AcceptFunction = Callable[..., tuple[int, int]]
#: ``round(method, session, verify, k, temperature, generator) -> RoundResult``: a whole round
#: for methods whose drafts are not one chain (a tree): propose through the drafting session,
#: score with ``verify`` (the verifier's forward over drafted tokens and their parents), decide
#: what is kept (:mod:`speculators_core.proposals.chain`).
RoundFunction = Callable[..., Any]


@dataclass(frozen=True)
class ProposalServing:
    """How vLLM serves a proposal method.

    * ``speculative_config``: keys merged into vLLM's ``speculative_config`` (JSON values only),
      e.g. ``{"draft_sample_method": "probabilistic"}``; empty for vLLM's defaults.
    * ``cpu_refusal``: empty when vLLM for CPU serves it; otherwise one line saying why not, naming
      the vLLM code (``serve``, ``eval --engine vllm`` and the quickstart refuse with it).
    """

    speculative_config: Mapping[str, Any] = field(default_factory=dict)
    cpu_refusal: str = ""


@dataclass(frozen=True)
class ProposalMethod:
    """A token-proposal method: the value of ``proposal_type`` in ``proposal_methods``, and its
    behaviour.

    * ``config_class``: what ``proposal_methods`` in ``config.json`` stores for it.
    * ``draft``: how the draft proposes at temperature > 0 (:data:`DraftFunction`); None: the
      chain of the draft's argmax tokens (vLLM's ``draft_sample_method: greedy``).
    * ``accept``: how the verifier accepts at temperature > 0 (:data:`AcceptFunction`); None:
      standard rejection sampling (Leviathan et al. 2023).
    * ``round``: a whole round (:data:`RoundFunction`), for drafts that are not one chain (a
      tree); None: :func:`~speculators_core.proposals.chain.chain_round` with ``draft`` and
      ``accept``.
    * ``vllm``: how vLLM serves it (:class:`ProposalServing`); None: vLLM has no equivalent.

    At temperature 0 every lossless method is the verifier's greedy output: the reference
    decoder drafts argmax chains and keeps the longest prefix equal to the verifier's argmax.
    """

    name: str
    config_class: type[TokenProposalConfig]
    description: str = ""
    provided_by: str = field(default="", compare=False)
    draft: DraftFunction | None = field(default=None, compare=False)
    accept: AcceptFunction | None = field(default=None, compare=False)
    round: RoundFunction | None = field(default=None, compare=False)
    vllm: ProposalServing | None = field(default_factory=ProposalServing)


#: ``detect(source_folder, config_dict)`` returns True when the folder is in this converter's format.
DetectFunction = Callable[[Path, dict[str, Any]], bool]
#: ``convert(source, *, verifier, output, dtype, **options) -> ReferenceForward | None`` reads
#: ``source`` and writes a speculators-format folder into ``output`` (an empty temporary folder
#: the core renames into place); ``dtype`` is the floating-point ``torch.dtype`` to write (None:
#: the source's own). It returns the source's own forward
#: (:class:`~speculators_core.conversion.ReferenceForward`) for ``--validate``, or None.
ConvertFunction = Callable[..., Any]


@dataclass(frozen=True)
class Converter:
    """A converter from a third-party checkpoint layout into the speculators format.

    ``name`` is the value of ``speculators convert --from NAME``; ``algorithm`` is the
    ``speculators_model_type`` the converted checkpoint has. A converter only reads and maps:
    atomic output, ``--overwrite``, ``--dtype`` (checked on the result) and ``--validate``
    (the converted draft's ``draft_logits`` against the returned reference forward, then
    ``speculators check``) are done by the core, :func:`speculators_core.conversion.run_conversion`.
    """

    name: str
    algorithm: str
    detect: DetectFunction
    convert: ConvertFunction
    description: str = ""
    provided_by: str = field(default="", compare=False)


#: ``loss(logits, target) -> per-position loss``: draft logits ``[N, V]`` and the verifier's
#: :class:`~speculators_core.objectives.TargetDistribution` at the same rows -> ``[N]`` fp32,
#: differentiable in ``logits``.
ObjectiveLoss = Callable[..., Any]


@dataclass(frozen=True)
class Objective:
    """A training objective: a per-position loss between the draft's and the verifier's
    next-token distributions (:mod:`speculators_core.objectives`).

    ``name`` is what users type (``--loss NAME`` or ``--loss NAME=W,NAME=W``). The algorithm
    masks, weights and averages the per-position values, so ``loss`` knows nothing of masks or
    training-time-test steps.
    """

    name: str
    loss: ObjectiveLoss
    description: str = ""
    provided_by: str = field(default="", compare=False)
