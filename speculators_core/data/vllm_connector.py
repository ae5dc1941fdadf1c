"""A CPU-capable store connector for vLLM's ``extract_hidden_states`` method (imported by vLLM).

vLLM's ``extract_hidden_states`` speculative method runs the verifier and writes the requested
layers' states into a cache-only KV layer; a KV connector then copies them out of the cache to
disk when a request finishes. The connector vLLM ships (``ExampleHiddenStatesConnector``)
copies through a CUDA stream, CUDA events and pinned memory, so it fails on CPU builds. This
subclass replaces only that copy: it reads the request's slots from the cache synchronously
and writes ``{"hidden_states": [L, n, H], "token_ids": [L]}`` to the request's file (temporary
name, then rename). Everything else (scheduling, block bookkeeping, file naming) is vLLM's.

vLLM loads this module by path (``kv_connector_module_path``) inside its engine process; the
rest of the project never imports it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    extract_from_kv_cache,
)

__all__ = ["CpuHiddenStatesConnector"]


class _Finished:
    """Stands in for the CUDA event the base class polls: the copy is already done."""

    def query(self) -> bool:
        return True


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    """``ExampleHiddenStatesConnector`` with a synchronous, device-agnostic copy to disk."""

    def _submit_async_write(self, pending: Any) -> None:
        if not self._is_tp_rank_zero:
            return
        cache = self._kv_cache
        assert cache is not None, "register_kv_caches was not called"
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (
            torch.arange(self._block_size, dtype=torch.long).reshape(1, -1)
            + block_ids.reshape(-1, 1) * self._block_size
        ).flatten()
        num_tokens = int(pending.token_ids.shape[0])
        states = extract_from_kv_cache(cache, slots.to(cache.device), num_tokens)
        tensors = {
            "hidden_states": states.detach().to("cpu").contiguous(),
            "token_ids": pending.token_ids.clone(),
        }
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        tmp = f"{pending.filename}.tmp-{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, pending.filename)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is not None:
            os.close(lock_fd)
        # The base class reports a request as sent once its "copy event" has completed.
        self._req_copy_events[pending.req_id] = _Finished()  # type: ignore[assignment]
