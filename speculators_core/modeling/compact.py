"""Frozen verifier copies in a narrower dtype, where that loses nothing.

A draft trains in fp32, and the verifier tensors it copies (an 8B verifier's 128k x 4,096
embedding: 2.1 GB in fp32) are cast to fp32 with it. When such a tensor is frozen and every
value is a bf16 value (as every value copied from a bf16 verifier is), storing it in bf16
changes no number the step computes (an embedding lookup then a cast gives the same fp32
rows) and halves its memory for the whole run. :func:`compact_frozen` does that, checking
exactness a block of rows at a time so the check itself adds little memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch
from torch import nn

__all__ = ["COMPACT_DTYPE", "compact_frozen"]

#: The narrower dtype frozen copies are stored in when exact.
COMPACT_DTYPE = torch.bfloat16
#: Rows per block of the exactness check and the copy (elements per block, about 64 MB fp32).
_BLOCK_ELEMENTS = 1 << 24
_MADV_PAGEOUT = 21  # Linux 5.4+


@torch.no_grad()
def compact_frozen(
    module: nn.Module, name: str = "weight", dtype: torch.dtype = COMPACT_DTYPE
) -> int:
    """Store ``module.<name>`` in ``dtype`` if it is frozen, wider and exactly representable.

    Returns the bytes saved (0 when left as it is: it trains, is not floating point, is already
    that narrow, or holds a value ``dtype`` cannot represent). Whoever reads the tensor casts
    what it reads to its compute dtype (the values are the same).
    """
    param = getattr(module, name)
    if (
        not isinstance(param, torch.Tensor)
        or param.requires_grad
        or not param.dtype.is_floating_point
        or param.element_size() <= torch.empty((), dtype=dtype).element_size()
        or type(param.data) is not torch.Tensor  # a DTensor shard: its sharding owns the dtype
    ):
        return 0
    flat = param.data.reshape(param.shape[0], -1) if param.dim() > 0 else param.data.reshape(1, 1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[1]))
    narrow = torch.empty(param.shape, dtype=dtype, device=param.device)
    narrow_flat = narrow.reshape(flat.shape)
    for start in range(0, flat.shape[0], rows):  # one pass: copy a block, then check it
        block, copy = flat[start : start + rows], narrow_flat[start : start + rows]
        copy.copy_(block)
        if not torch.equal(copy.to(block.dtype), block):
            return 0
    saved = param.numel() * (param.element_size() - narrow.element_size())
    setattr(module, name, nn.Parameter(narrow, requires_grad=False))
    if param.device.type == "cpu":
        _page_out(param.data)
    return saved


def _page_out(tensor: torch.Tensor) -> None:
    """Ask Linux to reclaim the pages of ``tensor`` now (``madvise(MADV_PAGEOUT)``).

    For a tensor memory-mapped from a checkpoint (how transformers loads safetensors) the
    mapping outlives the tensor (the file's other tensors share it), so its read pages stay
    resident after it is dropped; they are clean file pages, which this drops (a later read
    would fault them in from the file again). Anonymous memory is freed with the tensor anyway;
    the hint never loses data. Best effort: a no-op where unavailable.
    """
    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)
    except (OSError, AttributeError):
        pass
