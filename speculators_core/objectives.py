"""Training objectives: how far a draft's next-token distribution is from the verifier's.

An objective scores, position by position, the draft's logits ``[N, V]`` against the verifier's
distribution at the same positions (:class:`TargetDistribution`, computed once per batch and
shared by every objective and every TTT step), and returns a per-position loss ``[N]`` in fp32.
The algorithm masks, weights and averages those (EAGLE-3: per TTT step, over the positions the
step scores, times the step's decay), so an objective knows nothing of masks or steps.

Objectives are plugin records (:class:`~speculators_core.plugins.records.Objective`); the core
registers the standard ones below, a plugin adds its own through the
``speculators_register_objectives`` hook, and users pick one or a weighted mix by name:
``kl`` or ``kl=0.5,lk=0.5`` (:func:`parse_objective_spec`, :func:`resolve_objective`).
Whichever is chosen, training keeps one ``[N, V]`` tensor per call for the backward pass, as
the hand-written forward KL does: :class:`WeightedObjective` computes the objective's gradient
chunk by chunk in the forward pass and keeps only that (objectives are per-position, so it is
the whole Jacobian).

Notation, per position: ``p`` the verifier's distribution, ``q = softmax(logits)`` the draft's,
both over the draft vocabulary; ``alpha = sum_x min(p(x), q(x))`` is the probability that a
token drafted by sampling ``q`` is accepted by the standard rejection rule against ``p``
(FORMAT.md 3), and ``TV = 1 - alpha``.

* ``kl`` (forward KL): ``sum p (log p - log q)``. Mass-covering; the EAGLE-3 default. Its
  backward is written by hand (``q * sum(p) - p``), keeping no ``[N, V]`` autograd temporaries.
* ``rkl`` (reverse KL): ``sum q (log q - log p)``. Mode-seeking: the draft concentrates on the
  verifier's likeliest tokens.
* ``jsd`` (Jensen-Shannon): ``KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``.
* ``tv`` (total variation): ``sum |p - q| / 2 = 1 - alpha``: minimising it maximises
  acceptance under sampling directly, but its gradient vanishes where ``q`` has no mass.
* ``ce`` (cross-entropy on the verifier's token): ``-log q(argmax p)``: what greedy
  verification accepts, ignoring the rest of ``p``.
* ``nla`` (negative log acceptance): ``-log alpha``. Its gradient is the TV gradient divided
  by ``alpha``: it pushes hardest where acceptance is lowest.
* ``lk`` (acceptance-weighted KL/TV blend): ``lam * KL(p || q) + (1 - lam) * TV`` with
  ``lam = exp(-eta * alpha)`` (``alpha`` held constant, ``eta = 3``). Where the draft is far
  off (``alpha`` near 0) it is almost forward KL, whose gradient reaches every token; as
  acceptance grows the weight moves to TV, the quantity acceptance is made of.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from speculators_core.errors import SpeculatorsError

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost
    from speculators_core.plugins.records import Objective

__all__ = [
    "ALIASES",
    "BUILTIN_OBJECTIVES",
    "DEFAULT_OBJECTIVE",
    "LEAN_CHUNK_ELEMENTS",
    "LK_ETA",
    "ObjectiveFunction",
    "TargetDistribution",
    "WeightedObjective",
    "acceptance",
    "ce",
    "default_objective",
    "forward_kl",
    "jsd",
    "lk",
    "nla",
    "objective_spec",
    "parse_objective_spec",
    "resolve_objective",
    "resolve_objective_options",
    "reverse_kl",
    "tv",
]

#: The objective a draft trains with when none is named.
DEFAULT_OBJECTIVE = "kl"
#: ``eta`` of the ``lk`` blend: ``lam = exp(-eta * alpha)``.
LK_ETA = 3.0
#: ``alpha`` is clamped to at least this before ``log`` (``nla``): a draft with no overlap at a
#: position gets a large, finite loss instead of ``inf``.
MIN_ACCEPTANCE = 1e-6


@dataclass(frozen=True)
class TargetDistribution:
    """The verifier's next-token distribution at ``N`` scored positions, in fp32.

    Built once per batch (:meth:`from_logits`, or :meth:`from_head` chunk by chunk from the
    verifier's states) and indexed per TTT step (:meth:`take`): the log-softmax over the draft
    vocabulary is taken once, however many objectives and steps read it. Only ``log_probs`` is
    stored; ``probs`` is its ``exp``, computed when first read (one ``[N, V]`` tensor less for
    the whole step, and the memory-lean paths read it a chunk of rows at a time).
    """

    log_probs: torch.Tensor  # [N, V] fp32
    ids: torch.Tensor  # [N] int64: the verifier's argmax (what greedy verification emits)

    @cached_property
    def probs(self) -> torch.Tensor:
        """``exp(log_probs)``, ``[N, V]`` fp32."""
        return self.log_probs.exp()

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> TargetDistribution:
        """From the verifier's logits ``[N, V]`` (any float dtype)."""
        return cls(torch.log_softmax(logits.float(), dim=-1), logits.argmax(dim=-1))

    @classmethod
    @torch.no_grad()
    def from_head(
        cls,
        hidden: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
        vocab_size: int,
        *,
        chunk_elements: int | None = None,
    ) -> TargetDistribution:
        """From the verifier's states ``[N, H]`` and its head (states ``[n, H]`` -> logits
        ``[n, vocab_size]``), a chunk of rows at a time: the logits of all ``N`` rows never
        exist at once, only ``log_probs`` and one chunk's (about ``chunk_elements`` logits,
        default :data:`LEAN_CHUNK_ELEMENTS`)."""
        elements = LEAN_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        rows = hidden.shape[0]
        step = max(1, elements // max(1, vocab_size))
        log_probs = torch.empty((rows, vocab_size), dtype=torch.float32, device=hidden.device)
        ids = torch.empty(rows, dtype=torch.long, device=hidden.device)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            logits = head(hidden[start:end])  # [n, V]
            ids[start:end] = logits.argmax(dim=-1)
            log_probs[start:end] = torch.log_softmax(logits.float(), dim=-1)
        return cls(log_probs, ids)

    def take(self, index: torch.Tensor) -> TargetDistribution:
        """The distribution at rows ``index`` (``[M]`` int64)."""
        return TargetDistribution(self.log_probs[index], self.ids[index])

    def rows(self, start: int, end: int) -> TargetDistribution:
        """The distribution at rows ``start:end`` (views, no copy)."""
        return TargetDistribution(self.log_probs[start:end], self.ids[start:end])


#: An objective's loss: draft logits ``[N, V]`` and the target at the same rows -> ``[N]`` fp32.
#: Row ``i`` of the result depends on row ``i`` of the logits and the target only (what lets
#: :class:`WeightedObjective` compute any objective chunk by chunk, memory-lean).
ObjectiveFunction = Callable[[torch.Tensor, TargetDistribution], torch.Tensor]


class _ForwardKL(torch.autograd.Function):
    """``KL(p || softmax(logits))`` per row from ``log p`` and ``p``, in fp32.

    Autograd through ``log_softmax`` and the products would keep several ``[N, V]`` temporaries
    and walk them many times; the gradient is short: ``softmax(logits) * sum(p) - p``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target_log_probs: torch.Tensor,
        target_probs: torch.Tensor,
    ) -> torch.Tensor:
        log_q = torch.log_softmax(logits.float(), dim=-1)
        kl = (target_log_probs - log_q).mul_(target_probs).sum(dim=-1)
        ctx.save_for_backward(log_q, target_probs)
        ctx.logits_dtype = logits.dtype
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_q, target_probs = ctx.saved_tensors
        grad_logits = log_q.exp().mul_(target_probs.sum(dim=-1, keepdim=True))
        grad_logits.sub_(target_probs).mul_(grad.unsqueeze(-1))
        return grad_logits.to(ctx.logits_dtype), None, None


def forward_kl(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``KL(p || q)`` per position (hand-written backward)."""
    kl: torch.Tensor = _ForwardKL.apply(logits, target.log_probs, target.probs)
    return kl


def reverse_kl(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``KL(q || p)`` per position."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return (log_q.exp() * (log_q - target.log_probs)).sum(dim=-1)


def jsd(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """Jensen-Shannon divergence ``(KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    log_m = torch.logaddexp(target.log_probs, log_q) - math.log(2.0)
    to_p = (target.probs * (target.log_probs - log_m)).sum(dim=-1)
    to_q = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return 0.5 * (to_p + to_q)


def acceptance(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``alpha = sum min(p, q)`` per position: the chance a token sampled from q is accepted."""
    q = torch.softmax(logits.float(), dim=-1)
    return torch.minimum(target.probs, q).sum(dim=-1)


def tv(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """Total variation ``sum |p - q| / 2`` per position (``= 1 - alpha``)."""
    q = torch.softmax(logits.float(), dim=-1)
    return 0.5 * (target.probs - q).abs().sum(dim=-1)


def ce(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``-log q(argmax p)`` per position: cross-entropy on the token greedy decoding emits."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return -log_q.gather(-1, target.ids.unsqueeze(-1)).squeeze(-1)


def nla(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``-log alpha`` per position (``alpha`` clamped to :data:`MIN_ACCEPTANCE`)."""
    return -acceptance(logits, target).clamp_min(MIN_ACCEPTANCE).log()


def lk(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
    """``lam * KL(p || q) + (1 - lam) * TV`` with ``lam = exp(-LK_ETA * alpha)``, alpha constant."""
    alpha = acceptance(logits, target)
    lam = torch.exp(-LK_ETA * alpha.detach())
    total_variation = 1.0 - alpha
    return lam * forward_kl(logits, target) + (1.0 - lam) * total_variation


#: The core's objectives: name -> (function, one-line description).
BUILTIN_OBJECTIVES: dict[str, tuple[ObjectiveFunction, str]] = {
    "kl": (forward_kl, "forward KL(p || q): mass-covering; the EAGLE-3 default"),
    "rkl": (reverse_kl, "reverse KL(q || p): mode-seeking"),
    "jsd": (jsd, "Jensen-Shannon divergence of p and q"),
    "tv": (tv, "total variation 1 - alpha: acceptance under sampling, directly"),
    "ce": (ce, "cross-entropy on the verifier's argmax token (what greedy verification accepts)"),
    "nla": (nla, "negative log acceptance -log(alpha)"),
    "lk": (lk, "exp(-3 alpha) * KL + (1 - exp(-3 alpha)) * TV: KL while far off, then TV"),
}


#: Rows per chunk of the memory-lean path hold about this many logits, so the autograd
#: temporaries of one chunk (several ``[rows, V]`` fp32 tensors) stay a few tens of MB.
LEAN_CHUNK_ELEMENTS = 1 << 22


class _RowwiseLoss(torch.autograd.Function):
    """Any per-position objective with the memory footprint of the hand-written forward KL.

    Every objective's loss at row ``i`` depends on ``logits[i]`` alone (the contract of
    :data:`ObjectiveFunction`), so ``d loss_i / d logits`` is zero outside row ``i`` and the
    whole Jacobian is one ``[N, V]`` tensor: the gradient of ``sum_i loss_i``. The forward pass
    computes it chunk by chunk under autograd and keeps only it; the backward pass scales its
    rows by the incoming per-position gradient. Plain autograd would keep every ``[N, V]``
    temporary of the objective (log-softmax, probabilities, mixtures: five to eight of them for
    ``jsd``) until the backward pass.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        objective: ObjectiveFunction,
        target: TargetDistribution,
    ) -> torch.Tensor:
        rows = max(1, LEAN_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        values: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            with torch.enable_grad():
                piece = logits[start:end].detach().requires_grad_(True)
                value = objective(piece, target.rows(start, end))
                (grad,) = torch.autograd.grad(value.sum(), piece)
            values.append(value.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(logits))
        return torch.cat(values) if values else logits.new_zeros(0, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (jacobian,) = ctx.saved_tensors
        return jacobian * grad.unsqueeze(-1).to(jacobian.dtype), None, None


@dataclass(frozen=True)
class WeightedObjective:
    """A weighted sum of objectives: ``sum_i weight_i * loss_i`` per position.

    ``spec`` is the text it was made from (``kl`` or ``kl=0.5,lk=0.5``), recorded with a run.
    Calling it takes the memory-lean path when a gradient is wanted (:class:`_RowwiseLoss`:
    one ``[N, V]`` tensor kept for the backward pass, whatever the objectives), except for
    forward KL alone, whose hand-written backward already is that; :meth:`plain` is the same
    sum through ordinary autograd.
    """

    spec: str
    terms: tuple[tuple[Objective, float], ...]

    def __call__(self, logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
        if not (logits.requires_grad and torch.is_grad_enabled()):
            return self.plain(logits, target)
        if len(self.terms) == 1 and self.terms[0][0].loss is forward_kl and self.terms[0][1] == 1:
            return forward_kl(logits, target)
        value: torch.Tensor = _RowwiseLoss.apply(logits, self.plain, target)
        return value

    def plain(self, logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
        """The weighted sum per position, through ordinary autograd."""
        total: torch.Tensor | None = None
        for objective, weight in self.terms:
            value = objective.loss(logits, target)
            term = value if weight == 1.0 else weight * value
            total = term if total is None else total + term
        assert total is not None  # parse_objective_spec refuses an empty spec
        return total

    @property
    def names(self) -> list[str]:
        """The objectives' names, in order."""
        return [objective.name for objective, _ in self.terms]


#: The reference system's names for the same objectives (``--loss-fn``), accepted as aliases.
ALIASES = {"kl_div": "kl", "forward_kl": "kl", "reverse_kl": "rkl", "lk_hybrid": "lk"}


def default_objective() -> WeightedObjective:
    """Forward KL alone (:data:`DEFAULT_OBJECTIVE`), built without a plugin host."""
    return WeightedObjective(spec=DEFAULT_OBJECTIVE, terms=((_builtin(DEFAULT_OBJECTIVE), 1.0),))


def parse_objective_spec(spec: str) -> list[tuple[str, float]]:
    """``kl`` -> ``[("kl", 1.0)]``; ``kl=0.5,lk=0.5`` -> ``[("kl", 0.5), ("lk", 0.5)]``.

    A JSON object (``{"kl": 0.5, "lk": 0.5}``, the reference system's form) is accepted too,
    and so are its names (:data:`ALIASES`). A bad spec (empty, a weight that is not a positive
    number, a name twice) is one :class:`SpeculatorsError` line.
    """
    text = str(spec).strip()
    parts: list[str]
    if text.startswith("{"):
        import json

        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None
        if not isinstance(loaded, dict):
            raise SpeculatorsError(
                f"objective '{spec}' is not a JSON object of names to weights; write it as "
                "'kl=0.5,lk=0.5'"
            )
        parts = [f"{name}={weight}" for name, weight in loaded.items()]
    else:
        parts = text.split(",")
    terms: list[tuple[str, float]] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        name, _, weight_text = part.partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            weight = float("nan")
        if not name or not (weight > 0 and math.isfinite(weight)):
            raise SpeculatorsError(
                f"objective '{spec}' is not NAME or NAME=WEIGHT[,NAME=WEIGHT...] with positive "
                f"weights (e.g. 'kl' or 'kl=0.5,lk=0.5'); '{part}' is the problem"
            )
        if name in (n for n, _ in terms):
            raise SpeculatorsError(f"objective '{spec}' names '{name}' twice; give it once")
        terms.append((name, weight))
    if not terms:
        raise SpeculatorsError("the objective is empty; name one, e.g. 'kl' or 'kl=0.5,lk=0.5'")
    return terms


def _builtin(name: str) -> Objective:
    """A core objective as a record, without a plugin host."""
    from speculators_core.plugins.records import Objective

    if name not in BUILTIN_OBJECTIVES:
        raise SpeculatorsError(
            f"objective '{name}' is not one of the core's ({', '.join(sorted(BUILTIN_OBJECTIVES))}); "
            "a plugin's objective is looked up through a plugin host: pass host="
        )
    loss, description = BUILTIN_OBJECTIVES[name]
    return Objective(name=name, loss=loss, description=description, provided_by="speculators-core")


def resolve_objective(
    spec: str | WeightedObjective, host: PluginHost | None = None
) -> WeightedObjective:
    """The :class:`WeightedObjective` a spec names, each name looked up in ``host``'s objectives
    (an unknown name lists the installed ones); with no host, among the core's own."""
    if isinstance(spec, WeightedObjective):
        return spec
    terms = tuple(
        (host.objective(name) if host is not None else _builtin(name), weight)
        for name, weight in parse_objective_spec(spec)
    )
    return WeightedObjective(spec=str(spec).replace(" ", ""), terms=terms)


def objective_spec(value: Any) -> Any:
    """A training objective: ``kl`` or ``kl=0.5,lk=0.5`` (checked, kept as text) or a resolved
    :class:`~speculators_core.objectives.WeightedObjective` (passed through).

    The names are looked up in the run's plugin host when the draft is built
    (:func:`resolve_objective_options`), so a plugin's objective is as good as the core's.
    """
    if isinstance(value, WeightedObjective):
        return value
    if not isinstance(value, str):
        raise TypeError("not an objective spec")
    return ",".join(
        name if weight == 1.0 else f"{name}={weight:g}"
        for name, weight in parse_objective_spec(value)
    )


def resolve_objective_options(
    algorithm: Any, options: Mapping[str, Any], host: PluginHost
) -> dict[str, Any]:
    """``options`` with every value of an :func:`objective_spec` option replaced by the
    :class:`~speculators_core.objectives.WeightedObjective` it names in ``host`` (an unknown
    name lists the installed objectives)."""
    kinds = {option.name: option.type for option in algorithm.training_options}
    return {
        name: resolve_objective(value, host)
        if kinds.get(name) is objective_spec and value is not None
        else value
        for name, value in options.items()
    }
