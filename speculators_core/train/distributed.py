"""Process-group setup for ``torchrun`` and the few collectives the trainer needs.

Launched with ``torchrun --nproc_per_node N``, each process reads ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` from the environment, joins a process group (NCCL on GPUs, gloo on CPUs) and
shards the draft with FSDP2 (``fully_shard``). Run as a plain process, the same code is a no-op
wrapper: every collective returns its input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "shard_model"]

logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Rank, world size and device of this process; collectives that degrade to no-ops."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: True when this context created the process group (and so destroys it in ``close``).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is the process that logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = None) -> DistributedContext:
        """Join the ``torchrun`` process group if there is one (initialising it if needed)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None:
            dev = torch.device(device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world <= 1 and not (dist.is_available() and dist.is_initialized()):
            return cls(device=dev)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            owns = True
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            device=dev,
            owns_group=owns,
        )

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place; returned for convenience)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every process."""
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process (before sharding).

        Each process builds its own draft; random initialisations differ between processes, and
        FSDP would otherwise shard a mix of them.
        """
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def shard_model(
    model: nn.Module, ctx: DistributedContext, methods: tuple[str, ...] = ()
) -> nn.Module:
    """Shard ``model`` with FSDP2 across ``ctx``'s processes; returns the same module.

    Every element of an ``nn.ModuleList`` (decoder layers, in practice) becomes its own FSDP unit,
    then the root. ``methods`` are other methods than ``forward`` that run the model (the
    algorithm's ``training_step``): they are registered so the root's parameters are gathered
    around them too.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    units = [
        child
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for child in module
        if any(True for _ in child.parameters())
    ]
    # modules() is pre-order; shard the innermost units first, as FSDP requires.
    for unit in reversed(units):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model
