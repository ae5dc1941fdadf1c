"""The quickstart's settings: what the pipeline does, and how a budget sizes its stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError
from speculators_core.options import resolve_training_options

if TYPE_CHECKING:
    from speculators_core.plugins.records import Algorithm

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GENERATION_BACKENDS",
    "SAMPLES_PER_BUDGET_MINUTE",
    "QuickstartSettings",
    "default_samples",
]

#: Values of ``--generation-backend`` (see :attr:`QuickstartSettings.generation_backend`).
GENERATION_BACKENDS = ("auto", "one-pass", "vllm", "transformers")

#: Conversations regenerated per budget minute by default. On a 2-core CPU, answering 24
#: first-turn conversations with at most :data:`DEFAULT_MAX_NEW_TOKENS` tokens each and recording
#: their states in one pass costs about 10 minutes for a 30-minute budget (the decode steps are
#: those of 12 conversations with twice the answer length; the prefill doubles), so data takes
#: about a third of the budget; training and evaluation get the rest. The draft is data-limited
#: at this size: more conversations with shorter answers are more diverse data for the same
#: decoding, and measured +0.095 tau in vLLM over 12 per minute at 256 tokens with the same
#: training steps (benchmarks/bench_objectives.py, the short-answers lever).
SAMPLES_PER_BUDGET_MINUTE = 24

#: Tokens the verifier writes per regenerated answer by default (see above).
DEFAULT_MAX_NEW_TOKENS = 128


def default_samples(budget_minutes: float) -> int:
    """Training conversations regenerated for a budget of ``budget_minutes``."""
    return max(32, round(budget_minutes * SAMPLES_PER_BUDGET_MINUTE))


@dataclass
class QuickstartSettings:
    """Everything ``speculators quickstart`` does; recorded so a resumed run can be checked.

    Fields in :attr:`RESUME_FREE` may change when a run is resumed; the others decide the data
    and the draft, and must stay the same.
    """

    #: Verifier model folder, or ``smollm2`` (the embedded default).
    verifier: str = "smollm2"
    #: Chat data: ``sharegpt`` (built in, training split) or files/folders of conversations.
    data: list[str] = field(default_factory=lambda: ["sharegpt"])
    algorithm: str = "eagle3"
    #: Wall-clock budget of the whole pipeline, in minutes (data, training and evaluation).
    budget_minutes: float = 30.0
    #: Training conversations (default: :func:`default_samples` of the budget).
    samples: int | None = None
    #: Replace the data's answers with the verifier's own greedy answers (first turn only).
    regenerate: bool = True
    #: Tokens the verifier writes per regenerated answer.
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: Regeneration engine: ``one-pass`` (transformers decoding that records the hidden states
    #: as it writes the answers: one verifier pass instead of two), ``vllm`` or ``transformers``
    #: (answers first, then a capture pass); ``auto`` is ``one-pass``.
    generation_backend: str = "auto"
    #: Prompts longer than this are skipped; samples are truncated to it.
    seq_length: int = 1024
    #: Draft vocabulary: the most frequent supervised tokens of the training data.
    draft_vocab_size: int = 4096
    #: Draft tokens per round (served and evaluated); also the algorithm's ``speculative_tokens``
    #: option when it declares one.
    k: int = 3
    #: The algorithm's training options (names of ``Algorithm.training_options``, e.g.
    #: ``{"ttt_steps": 3}`` for eagle3). :meth:`with_algorithm` checks and converts them and
    #: adds the algorithm's declared defaults, so the recorded settings show every value used.
    algo_options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-3
    #: ``adamw``, or ``muon`` (Muon on the hidden matrices, AdamW on the rest; see
    #: :class:`~speculators_core.train.optim.MuonAdamW`), or any ``torch.optim`` class by name.
    optimizer: str = "adamw"
    #: Packed row length of training batches.
    train_seq_len: int = 2048
    #: Minutes kept for evaluation and the report after training.
    eval_reserve_minutes: float = 5.0
    #: Held-out evaluation: where the prompts come from (``sharegpt-heldout`` or a file), how
    #: many, new tokens per prompt.
    eval_prompt_source: str = "sharegpt-heldout"
    eval_prompts: int = 32
    eval_max_new_tokens: int = 128
    #: Evaluation engines: reference decoder and/or vLLM (vLLM is skipped when not installed).
    reference_eval: bool = True
    #: The reference decoder measures the first this-many evaluation prompts (it decodes one
    #: prompt at a time: on a 2-core CPU all 32 took 7.5 minutes; vLLM measures them all).
    reference_prompts: int = 8
    vllm_eval: bool = True
    #: After the draft is made: ``vllm serve`` for the verifier alone, the draft at each of
    #: :attr:`server_k_values` and n-gram lookup, one at a time, driven over HTTP with the first
    #: :attr:`server_prompts` evaluation prompts at each :attr:`server_concurrency` level; the
    #: fastest k at concurrency 1 is chosen (written into the draft when it pays) and the report's
    #: speed figure is its speed-up. Skipped when vLLM is not installed. Not part of the budget:
    #: it measures the draft the budget made (about 1.5 minutes per server on a 2-core CPU).
    server_eval: bool = True
    server_k_values: list[int] = field(default_factory=lambda: [1, 2, 3])
    server_concurrency: list[int] = field(default_factory=lambda: [1, 4])
    server_prompts: int = 8
    seed: int = 0

    #: Fields that may differ on resume: they do not change the data or the draft's definition.
    RESUME_FREE = (
        "budget_minutes",
        "eval_reserve_minutes",
        "eval_prompt_source",
        "eval_prompts",
        "eval_max_new_tokens",
        "reference_eval",
        "reference_prompts",
        "vllm_eval",
        "server_eval",
        "server_k_values",
        "server_concurrency",
        "server_prompts",
    )

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise SpeculatorsError(f"--budget-minutes must be positive, not {self.budget_minutes}")
        if self.samples is None:
            self.samples = default_samples(self.budget_minutes)
        for name in ("samples", "max_new_tokens", "seq_length", "draft_vocab_size", "k"):
            if getattr(self, name) < 1:
                raise SpeculatorsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise SpeculatorsError(
                f"unknown generation backend '{self.generation_backend}'; use one of "
                f"{', '.join(GENERATION_BACKENDS)}"
            )
        if self.eval_reserve_minutes < 0:
            raise SpeculatorsError("--eval-reserve-minutes must be 0 or more")
        if self.eval_prompts < 1 or self.eval_max_new_tokens < 1 or self.reference_prompts < 1:
            raise SpeculatorsError(
                "--eval-prompts, --eval-max-new-tokens and --reference-prompts must be >= 1"
            )
        if self.optimizer.lower() != "muon":
            from speculators_core.train.optim import optimizer_class

            optimizer_class(self.optimizer)  # an unknown name is one line, before any output
        if self.server_prompts < 1:
            raise SpeculatorsError("--server-prompts must be at least 1")
        for name in ("server_k_values", "server_concurrency"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise SpeculatorsError(
                    f"--{name.replace('_', '-')} takes positive integers, not {values!r}"
                )
            setattr(self, name, sorted({int(v) for v in values}))
        if not isinstance(self.algo_options, dict):
            raise SpeculatorsError(
                f"algo_options must be a mapping of option names to values, not {self.algo_options!r}"
            )

    def with_algorithm(self, algorithm: Algorithm) -> QuickstartSettings:
        """A copy whose ``algo_options`` are checked against ``algorithm``'s declared options
        (an unknown name or a value of the wrong type is one-line error), converted, and
        completed with the declared defaults; ``speculative_tokens`` defaults to :attr:`k` when
        the algorithm declares it. An algorithm that declares no options gets the given ones."""
        given = resolve_training_options(algorithm, self.algo_options)
        declared = {option.name: option for option in algorithm.training_options}
        if "speculative_tokens" in declared and given.get("speculative_tokens") is None:
            # The draft records what the quickstart serves and evaluates.
            given["speculative_tokens"] = self.k
        defaults = {
            name: option.default
            for name, option in declared.items()
            if option.default is not None and name not in given
        }
        return dataclasses.replace(self, algo_options={**defaults, **given})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    def changed_fixed_fields(self, recorded: dict[str, Any]) -> list[str]:
        """The fields that differ from ``recorded`` and may not change on resume."""
        mine = self.to_json()
        # A field newer than the recorded run counts as its default there.
        defaults = QuickstartSettings().to_json()
        return [
            name
            for name in mine
            if name not in self.RESUME_FREE and recorded.get(name, defaults[name]) != mine[name]
        ]
