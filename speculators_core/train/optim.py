"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from speculators_core.train.arguments import TrainingArguments
from speculators_core.train.errors import TrainingConfigError

__all__ = [
    "MuonAdamW",
    "build_optimizer",
    "build_scheduler",
    "lr_lambda",
    "optimizer_class",
    "warmup_steps",
]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (case-insensitive), or a clear error."""
    available = {
        attr.lower(): obj
        for attr, obj in vars(torch.optim).items()
        if inspect.isclass(obj)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }
    cls = available.get(name.lower())
    if cls is None:
        raise TrainingConfigError(
            f"unknown optimizer '{name}'; choose one of torch.optim's: {', '.join(sorted(available))}"
        )
    return cls


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden weight matrices, AdamW on everything else, as one optimizer.

    Muon orthogonalises each update of a 2-D matrix (Newton-Schulz iterations on the momentum);
    it is meant for the hidden layers' matrices only. Embeddings, the LM head, norm weights and
    biases keep AdamW. Both inner optimizers share this optimizer's ``state`` and its
    ``param_groups`` are theirs (the same dicts), so the learning-rate schedule, gradient
    clipping and checkpoints (``state_dict``/``load_state_dict``) see one ordinary optimizer.
    Muon's learning rate is adjusted to match AdamW's update RMS (``adjust_lr_fn =
    "match_rms_adamw"``), so one ``--learning-rate`` serves both.
    """

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        muon_kwargs: dict[str, Any] | None = None,
        adamw_kwargs: dict[str, Any] | None = None,
    ) -> None:
        muon_options = {"adjust_lr_fn": "match_rms_adamw", **(muon_kwargs or {})}
        self.muon = torch.optim.Muon(muon_groups, lr=lr, **muon_options) if muon_groups else None
        self.adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, **(adamw_kwargs or {})) if adamw_groups else None
        )
        inner = [o for o in (self.muon, self.adamw) if o is not None]
        groups = [g for o in inner for g in o.param_groups]
        super().__init__(groups, {"lr": lr})
        self.param_groups = groups  # the inner optimizers' own dicts, not copies
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's state and (sliced) param groups."""
        start = 0
        for inner in (self.muon, self.adamw):
            if inner is None:
                continue
            count = len(inner.param_groups)
            inner.param_groups = self.param_groups[start : start + count]
            inner.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self.muon, self.adamw):
            if inner is not None:
                inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaces the state and the group dicts


def _is_muon_matrix(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """A hidden-layer weight matrix: 2-D, not an embedding, not the LM head."""
    return param.dim() == 2 and not isinstance(module, nn.Embedding) and "lm_head" not in name


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of ``model``.

    Matrices (2+ dims) get ``args.weight_decay``; vectors (norm weights, biases) get none, since
    decaying them only pulls scales towards zero. Adam and AdamW run their leanest
    implementation unless ``optimizer_kwargs`` names ``foreach`` or ``fused``
    (:func:`_lean_adam_kwargs`). ``optimizer="muon"`` is :class:`MuonAdamW`:
    Muon on the hidden weight matrices, AdamW (with ``optimizer_kwargs``' ``betas``/``eps``)
    on embeddings, the LM head, norms and biases.
    """
    if args.optimizer.lower() == "muon":
        return _build_muon(model, args)
    params = _trainable(model)
    groups = _decay_groups(params, args.weight_decay)
    cls = optimizer_class(args.optimizer)
    kwargs = _json_kwargs(args.optimizer_kwargs)
    if "foreach" not in kwargs and "fused" not in kwargs:
        kwargs.update(_lean_adam_kwargs(cls, params))
    try:
        return cls(groups, lr=args.learning_rate, **kwargs)  # type: ignore[call-arg]
    except TypeError as err:
        raise TrainingConfigError(
            f"optimizer '{args.optimizer}' rejects optimizer_kwargs {kwargs!r}: {err}"
        ) from err


def _lean_adam_kwargs(
    cls: type[torch.optim.Optimizer], params: list[nn.Parameter]
) -> dict[str, Any]:
    """Adam's and AdamW's implementation when the user names none: the least memory.

    torch's default (``foreach``) computes each step's temporaries for all parameters at once:
    an extra copy of every trainable parameter or two at the step's peak (1.2 GB each for an
    8B verifier's one-layer draft). The fused kernel (CPU and CUDA) keeps none and is the
    fastest; its numbers differ from ``foreach``'s in the last bit of a few values (another
    order of the same operations). Elsewhere the per-parameter loop (``foreach=False``) keeps
    one parameter's worth, with ``foreach``'s numbers. Sharded (DTensor) parameters keep
    torch's default.
    """
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or not params:
        return {}
    if any(type(p.data) is not torch.Tensor for p in params):  # DTensor shards (FSDP2)
        return {}
    if all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params):
        return {"fused": True}
    return {"foreach": False}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train; a one-line error when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingConfigError(
            f"{type(model).__name__} has no trainable parameters; nothing to train"
        )
    return params


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (2+ dims) with ``weight_decay``, vectors without; empty groups left out."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of optimizer kwargs with JSON's lists turned into the tuples torch expects."""
    kwargs = dict(kwargs)
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])  # JSON has no tuples
    return kwargs


def warmup_steps(args: TrainingArguments, total_steps: int) -> int:
    """Warm-up length: ``args.warmup_steps`` or ``warmup_ratio`` of the run (rounded up)."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return math.ceil(args.warmup_ratio * total_steps)


def lr_lambda(
    scheduler: str, warmup: int, total_steps: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate after ``step`` optimizer steps.

    Linear warm-up from ``1/(warmup+1)`` to 1 over ``warmup`` steps (never exactly 0, so the
    first step moves), then ``constant``, or ``linear``/``cosine`` decay to ``min_ratio`` at
    ``total_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if scheduler == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + decay schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(
            args.lr_scheduler, warmup_steps(args, total_steps), total_steps, args.min_lr_ratio
        ),
    )


def _build_muon(model: nn.Module, args: TrainingArguments) -> MuonAdamW:
    owners = {
        id(param): (f"{prefix}.{name}" if prefix else name, module)
        for prefix, module in model.named_modules()
        for name, param in module.named_parameters(recurse=False)
    }
    muon: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for param in _trainable(model):
        name, module = owners[id(param)]
        (muon if _is_muon_matrix(name, param, module) else rest).append(param)
    kwargs = _json_kwargs(args.optimizer_kwargs)
    muon_keys = {"momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"}
    muon_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in muon_keys}
    try:
        return MuonAdamW(
            [{"params": muon, "weight_decay": args.weight_decay}] if muon else [],
            _decay_groups(rest, args.weight_decay),
            lr=args.learning_rate,
            muon_kwargs=muon_kwargs,
            adamw_kwargs=kwargs,
        )
    except (TypeError, ValueError) as err:
        raise TrainingConfigError(
            f"optimizer 'muon' rejects optimizer_kwargs {args.optimizer_kwargs!r}: {err}"
        ) from err
