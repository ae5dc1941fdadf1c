"""A reference speculative decoder in plain PyTorch + transformers.

The verifier is any transformers causal LM; the draft is any installed algorithm's
:class:`~speculators_core.drafting.DraftSession`. Each round the draft proposes ``k`` tokens
(chain drafting), the verifier scores them in one cached forward, and a proposal method
(:class:`~speculators_core.plugins.records.ProposalMethod`, the core's ``greedy`` by default)
decides what is kept:

* ``temperature == 0``: argmax chains; keep the longest prefix of drafted tokens equal to the
  verifier's argmax, then emit the verifier's own argmax at the first mismatch (or the bonus
  token after ``k`` accepts). The output is exactly the verifier's greedy output, whatever the
  method (every lossless rule reduces to this one).
* sampled (``temperature > 0``): the method's ``draft`` proposes (``greedy``: the argmax chain,
  one-hot distributions) and its ``accept`` rule keeps a prefix and emits one more token
  (``greedy``: standard rejection sampling, Leviathan et al. 2023). Lossless methods emit
  tokens distributed exactly as the verifier's own sampling.

Both sides keep KV caches: the verifier's is cropped back to the accepted prefix after each
round, the draft session discards its speculative positions on the next ``extend``. Sequences
are decoded one at a time (batch size 1); :func:`evaluate_prompts` runs a list of prompts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speculators_core.data.capture import StateRecorder
from speculators_core.proposals.chain import GREEDY, chain_round, greedy_match, standard_rule

if TYPE_CHECKING:
    from speculators_core.plugins.records import ProposalMethod

__all__ = [
    "DecodeStats",
    "GenerationResult",
    "ReferenceDecoder",
    "accept_greedy",
    "accept_sampled",
    "decode_threads",
    "fastest_decode_threads",
]


@contextlib.contextmanager
def decode_threads(verifier: nn.Module) -> Iterator[int]:
    """Run the block with :func:`fastest_decode_threads` torch threads; restore them after."""
    before = torch.get_num_threads()
    chosen = fastest_decode_threads(verifier)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)


def rollback_cache(config: Any) -> Any:
    """A transformers ``DynamicCache`` for the verifier of ``config`` whose every layer can be
    cropped back, and re-indexed, after a round's rejected tokens.

    For sliding-window layers (Gemma 2/3, gpt-oss, Mistral with a window) transformers keeps
    only the last window of keys and refuses to crop them once the window is full; here those
    layers keep every key instead. The attention mask still applies the window (transformers
    builds it from the config, not from the cache), so the logits are the same; the cache just
    holds more.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    cache.layers = [
        DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
        for layer in cache.layers
    ]
    return cache


@torch.no_grad()
def fastest_decode_threads(verifier: nn.Module, *, repeats: int = 3) -> int:
    """The torch thread count (the current one, or 1) that runs a small cached forward faster.

    A decoding step is a few tokens through every layer: hundreds of small kernels, each a
    parallel region whose threads meet at a barrier. On a quiet machine more threads are a bit
    faster; on a busy one a descheduled thread stalls every barrier and a step becomes several
    times slower than with one thread (seen: 145 ms with 1 thread, 700-1200 ms with 2, for
    SmolLM2 on a loaded 2-core CPU). Timing both settings on a short cache decides.
    """
    current = torch.get_num_threads()
    if current <= 1:
        return current
    config: Any = verifier.config
    device = next(verifier.parameters()).device
    vocab = int(getattr(config, "vocab_size", 2))
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (1, 64), generator=generator).to(device)
    step = torch.randint(0, vocab, (1, 4), generator=generator).to(device)
    timings: dict[int, float] = {}
    try:
        for threads in (current, 1):
            torch.set_num_threads(threads)
            cache = rollback_cache(config)
            verifier(input_ids=context, past_key_values=cache, use_cache=True)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                verifier(input_ids=step, past_key_values=cache, use_cache=True)
                cache.crop(-step.shape[1])  # back to the 64-token context
                best = min(best, time.perf_counter() - started)
            timings[threads] = best
    finally:
        torch.set_num_threads(current)
    return min(timings, key=lambda t: (timings[t], -t))


@dataclass
class DecodeStats:
    """Acceptance and speed counters, summable over sequences.

    ``accepted_per_position[i]`` counts the rounds whose drafted token ``i`` (0-based) was
    accepted; a round accepts a prefix, so the list is non-increasing. The mean acceptance length
    (tokens per verifier forward in a drafting round) is ``1 + sum(accepted) / rounds``, the
    same quantity vLLM reports as "mean acceptance length".
    """

    k: int
    rounds: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    new_tokens: int = 0
    verifier_forwards: int = 0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.k

    def add_round(self, accepted: int) -> None:
        """Record one drafting round in which ``accepted`` drafted tokens were kept."""
        self.rounds += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def merge(self, other: DecodeStats) -> None:
        """Add another sequence's counters to these."""
        if other.k != self.k:
            raise ValueError(f"cannot merge stats for k={other.k} into k={self.k}")
        self.rounds += other.rounds
        self.accepted_per_position = [
            a + b for a, b in zip(self.accepted_per_position, other.accepted_per_position)
        ]
        self.new_tokens += other.new_tokens
        self.verifier_forwards += other.verifier_forwards
        self.wall_s += other.wall_s

    @property
    def num_accepted(self) -> int:
        """Drafted tokens accepted in all rounds."""
        return sum(self.accepted_per_position)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per drafting round (1 + accepted drafted tokens per round)."""
        return 1.0 + self.num_accepted / self.rounds if self.rounds else float("nan")

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """Fraction of rounds in which drafted token ``i`` was accepted (cumulative acceptance)."""
        return [
            a / self.rounds if self.rounds else float("nan") for a in self.accepted_per_position
        ]

    @property
    def conditional_acceptance_per_position(self) -> list[float]:
        """P(token ``i`` accepted | tokens ``< i`` accepted)."""
        out: list[float] = []
        previous = self.rounds
        for a in self.accepted_per_position:
            out.append(a / previous if previous else float("nan"))
            previous = a
        return out

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "k": self.k,
            "rounds": self.rounds,
            "new_tokens": self.new_tokens,
            "verifier_forwards": self.verifier_forwards,
            "wall_s": self.wall_s,
            "tokens_per_second": self.tokens_per_second,
            "mean_acceptance_length": self.mean_acceptance_length,
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_rate_per_position": self.acceptance_rate_per_position,
            "conditional_acceptance_per_position": self.conditional_acceptance_per_position,
        }


@dataclass
class GenerationResult:
    """The generated token ids of one prompt and its counters."""

    tokens: list[int]
    stats: DecodeStats


#: Greedy verification of one round (kept under its older name).
accept_greedy = greedy_match
#: Rejection-sampling verification of one round (kept under its older name).
accept_sampled = standard_rule


class _RoundForward:
    """The verifier's forward of one round (the :class:`~speculators_core.proposals.chain.Verify`
    a proposal method calls), and trimming the cache to what the round kept.

    A chain runs as plain causal decoding; a tree as one forward with each drafted token at
    position ``cached + depth`` seeing the context and its ancestors only.
    """

    def __init__(self, verifier: nn.Module, cache: Any, last: torch.Tensor, cached: int) -> None:
        self.verifier = verifier
        self.cache = cache
        self.last = last  # [1, 1]: the newest verified token (its KV is not cached yet)
        self.cached = cached
        self.tokens: list[int] = []
        self.chain = True
        self.calls = 0

    def __call__(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        self.calls += 1
        n = len(tokens)
        if len(parents) != n or any(not 0 <= p <= i for i, p in enumerate(parents)):
            raise ValueError(
                f"parents {list(parents)} must give each drafted token a row before its own"
            )
        self.tokens = [int(t) for t in tokens]
        self.chain = list(parents) == list(range(n))
        device = self.last.device
        ids = torch.cat([self.last, torch.tensor([self.tokens], device=device)], dim=1)
        if self.chain:
            out = self.verifier(input_ids=ids, past_key_values=self.cache, use_cache=True)
            return out.logits[0]
        depth = [0] * (n + 1)
        ancestors = torch.eye(n + 1, dtype=torch.bool)
        for i, parent in enumerate(parents):
            depth[i + 1] = depth[parent] + 1
            ancestors[i + 1] |= ancestors[parent]
        dtype = next(self.verifier.parameters()).dtype
        allowed = torch.cat([torch.ones(n + 1, self.cached, dtype=torch.bool), ancestors], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask[~allowed] = torch.finfo(dtype).min
        positions = torch.tensor([[self.cached + d for d in depth]], device=device)
        out = self.verifier(
            input_ids=ids,
            past_key_values=self.cache,
            position_ids=positions,
            attention_mask=mask[None, None].to(device),
            use_cache=True,
        )
        return out.logits[0]

    def keep(self, rows: list[int]) -> None:
        """Keep the cache entries of these rows (0 = the last verified token) after the context."""
        dropped = len(self.tokens) + 1 - len(rows)
        if self.chain and rows == list(range(len(rows))):
            if dropped:
                self.cache.crop(-dropped)
            return
        index = torch.tensor([*range(self.cached), *(self.cached + r for r in rows)])
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, index.to(layer.keys.device)]
            layer.values = layer.values[:, :, index.to(layer.values.device)]


class ReferenceDecoder:
    """Speculative decoding with a transformers verifier and a speculator's drafting session.

    ``draft=None`` decodes with the verifier alone (same code path for caches and sampling), the
    baseline for speed and for losslessness checks.
    """

    def __init__(
        self,
        verifier: nn.Module,
        draft: Any | None = None,
        *,
        k: int = 3,
        eos_token_ids: Iterable[int] = (),
        proposal: ProposalMethod | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k (draft tokens per round) must be at least 1, got {k}")
        self.verifier = verifier.eval()
        self.draft = draft.eval() if draft is not None else None
        self.k = k
        self.eos = set(eos_token_ids)
        self.proposal = proposal if proposal is not None else GREEDY

    def _new_cache(self) -> Any:
        return rollback_cache(self.verifier.config)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (stops after EOS)."""
        prompt = torch.as_tensor(
            list(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else prompt_ids
        )
        prompt = prompt.reshape(1, -1).long().to(self._device)
        if prompt.shape[1] == 0:
            raise ValueError("cannot generate from an empty prompt")
        stats = DecodeStats(k=self.k)
        start = time.perf_counter()
        recorder = (
            StateRecorder(self.verifier, self.draft.hidden_state_spec())
            if self.draft is not None
            else None
        )
        try:
            tokens = self._decode(prompt, max_new_tokens, temperature, generator, stats, recorder)
        finally:
            if recorder is not None:
                recorder.close()
        stats.wall_s = time.perf_counter() - start
        stats.new_tokens = len(tokens)
        return GenerationResult(tokens=tokens, stats=stats)

    @property
    def _device(self) -> torch.device:
        return next(self.verifier.parameters()).device

    def _probs(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(logits.float() / temperature, dim=-1)

    def _pick(
        self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None
    ) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(self._probs(logits, temperature), 1, generator=generator))

    def _decode(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        stats: DecodeStats,
        recorder: StateRecorder | None,
    ) -> list[int]:
        cache = self._new_cache()
        out = self.verifier(input_ids=prompt, past_key_values=cache, use_cache=True)
        stats.verifier_forwards += 1
        emitted = [self._pick(out.logits[0, -1], temperature, generator)]
        cached = prompt.shape[1]  # positions whose KV the verifier cache holds
        session = None
        if self.draft is not None and recorder is not None:
            session = self.draft.draft_session(batch_size=1)
            first = torch.tensor([[emitted[0]]], device=prompt.device)
            session.extend(torch.cat([prompt, first], dim=1), recorder.take())
        while len(emitted) < max_new_tokens and emitted[-1] not in self.eos:
            last = torch.tensor([[emitted[-1]]], device=prompt.device)
            if session is None:
                out = self.verifier(input_ids=last, past_key_values=cache, use_cache=True)
                stats.verifier_forwards += 1
                cached += 1
                emitted.append(self._pick(out.logits[0, -1], temperature, generator))
                continue
            forward = _RoundForward(self.verifier, cache, last, cached)
            result = (self.proposal.round or chain_round)(
                self.proposal, session, forward, self.k, temperature, generator
            )
            if forward.calls != 1:
                raise RuntimeError(
                    f"proposal method '{self.proposal.name}' ran the verifier {forward.calls} "
                    "times in one round; a round is one verifier forward"
                )
            stats.verifier_forwards += 1
            assert recorder is not None
            states = recorder.take()  # [1, 1 + n, S, H]: the last verified token, then drafts
            accepted = len(result.path)
            stats.add_round(accepted)
            # Keep the KV of the last verified token and of the accepted drafted tokens; drop
            # the others.
            rows = [0, *result.path]
            forward.keep(rows)
            cached += accepted + 1
            new_tokens = [*(forward.tokens[r - 1] for r in result.path), result.next_token]
            session.extend(torch.tensor([new_tokens], device=prompt.device), states[:, rows])
            emitted.extend(new_tokens)
        # Truncate to the budget and just after the first end-of-sequence token.
        emitted = emitted[:max_new_tokens]
        for i, token in enumerate(emitted):
            if token in self.eos:
                return emitted[: i + 1]
        return emitted
