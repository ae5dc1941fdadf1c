"""Capture verifier hidden states with transformers: the embedded, default backend (CPU or GPU).

What is captured follows :class:`~speculators_core.features.HiddenStateSpec` and vLLM's
semantics (FORMAT.md 2.7): id ``k < N`` is the residual stream *entering* decoder layer ``k``
(transformers' ``output_hidden_states[k]``; 0 is the embeddings), id ``N`` is the output of the
last decoder layer **before** the final norm, and with ``post_norm_last`` the last id is taken
**after** the final norm (what EAGLE-1/HASS use).

The states are read with forward hooks on the decoder: a pre-hook on layer ``k`` for id ``k``,
a pre-hook (input) or hook (output) on the final norm for id ``N``. The LM head never runs (the
decoder is called, not the causal-LM wrapper), and when the highest id is below ``N`` the
forward stops right after capturing it. Batches are right-padded with an attention mask;
causal attention keeps every real token's states identical to an unbatched run up to
floating-point reassociation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from speculators_core.data.errors import VerifierError
from speculators_core.features import HiddenStateSpec

__all__ = ["HiddenStateCapture", "StateRecorder", "decoder_parts", "plan_batches"]


class _StopForward(Exception):
    """Raised by a hook once every requested state is captured, to skip the rest of the model."""


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The decoder stack of a causal LM: ``(decoder, decoder.layers, decoder.norm)``."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        arch = type(model).__name__
        raise VerifierError(
            f"verifier architecture {arch} is not supported for hidden-state capture: its "
            "decoder has no '.layers' list and '.norm' final norm (Llama/Qwen/Mistral-style "
            "models have both)"
        )
    return decoder, layers, norm


def plan_batches(
    lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Group sample indices into batches of similar length (longest first, deterministic).

    A batch holds at most ``batch_size`` samples and, if given, at most ``max_batch_tokens``
    padded tokens (``len(batch) * longest``); a single longer sample gets a batch of its own.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        too_many = len(current) >= batch_size
        too_big = max_batch_tokens is not None and (len(current) + 1) * longest > max_batch_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class StateRecorder:
    """Records the states a spec asks for while a verifier (decoder or causal LM) runs forward.

    Hooks are attached on construction and removed by :meth:`close` (or leaving the ``with``
    block): a pre-hook on decoder layer ``k`` for id ``k < N``; for id ``N`` a pre-hook on the
    final norm (pre-norm state) or, with ``post_norm_last``, a hook on its output. After each
    forward, :meth:`take` returns ``[B, T, len(spec.layer_ids), H]`` in spec order.

    With ``stop_early`` and only layer ids requested, the forward is cut short (by an exception
    that :meth:`run` swallows) right after the last needed state: later layers never run.
    """

    def __init__(
        self, model: nn.Module, spec: HiddenStateSpec, *, stop_early: bool = False
    ) -> None:
        _decoder, layers, norm = decoder_parts(model)
        self.num_layers = len(layers)
        try:
            spec.validate(self.num_layers)
        except ValueError as err:
            raise VerifierError(f"{err}; pick layer ids for this verifier") from None
        self.spec = spec
        self._got: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        last = len(spec.layer_ids) - 1
        only_layers = all(k < self.num_layers for k in spec.layer_ids)
        self._stop_at = max(spec.layer_ids) if stop_early and only_layers else None
        for pos, k in enumerate(spec.layer_ids):
            if k < self.num_layers:
                self._handles.append(
                    layers[k].register_forward_pre_hook(self._layer_hook(pos, k), with_kwargs=True)
                )
            elif spec.post_norm_last and pos == last:
                self._handles.append(norm.register_forward_hook(self._norm_out_hook(pos)))
            else:
                self._handles.append(norm.register_forward_pre_hook(self._norm_in_hook(pos)))

    def _layer_hook(self, pos: int, k: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._got[pos] = args[0] if args else kwargs["hidden_states"]
            if self._stop_at == k and len(self._got) == len(self.spec.layer_ids):
                raise _StopForward

        return hook

    def _norm_in_hook(self, pos: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self._got[pos] = args[0]

        return hook

    def _norm_out_hook(self, pos: int) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            self._got[pos] = out

        return hook

    def run(self, module: nn.Module, **inputs: Any) -> Any:
        """Call ``module(**inputs)``, tolerating an early stop; returns its output (None if stopped)."""
        try:
            return module(**inputs)
        except _StopForward:
            return None

    def take(self) -> torch.Tensor:
        """The states recorded by the last forward, ``[B, T, n, H]``."""
        missing = [
            self.spec.layer_ids[p] for p in range(len(self.spec.layer_ids)) if p not in self._got
        ]
        if missing:
            raise RuntimeError(
                f"no hidden states were recorded for layer ids {missing}; run a forward first"
            )
        states = torch.stack([self._got[p] for p in range(len(self.spec.layer_ids))], dim=2)
        self._got.clear()
        return states

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HiddenStateCapture:
    """Runs the verifier's decoder and returns the states a spec asks for.

    ``model`` is a loaded causal LM (``AutoModelForCausalLM``); ``spec`` is validated against
    its number of layers. :meth:`capture_batch` takes 1-D token-id tensors and returns one
    ``[L, len(spec.layer_ids), hidden]`` tensor per sample (in the model's dtype, on CPU
    unless ``keep_on_device``).
    """

    def __init__(self, model: nn.Module, spec: HiddenStateSpec) -> None:
        self.model = model
        self.spec = spec
        self.decoder, self.layers, self.norm = decoder_parts(model)
        self.num_layers = len(self.layers)
        try:
            spec.validate(self.num_layers)
        except ValueError as err:
            raise VerifierError(f"{err}; pick layer ids for this verifier") from None
        config = getattr(model, "config", None)
        self.hidden_size = int(getattr(config, "hidden_size", 0) or 0)

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        spec: HiddenStateSpec,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> HiddenStateCapture:
        """Load the verifier folder (float32 on CPU by default) and wrap it."""
        from speculators_core.data.verifier import load_verifier_model

        return cls(load_verifier_model(verifier, dtype=dtype, device=device), spec)

    @property
    def device(self) -> torch.device:
        """Where the verifier's weights are."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The verifier's compute dtype."""
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def capture_batch(
        self, input_ids: Sequence[torch.Tensor], *, keep_on_device: bool = False
    ) -> list[torch.Tensor]:
        """Hidden states ``[L_i, n, H]`` for each 1-D ``input_ids[i]`` (one padded forward)."""
        if not input_ids:
            return []
        lengths = [int(t.numel()) for t in input_ids]
        if min(lengths) < 1:
            raise ValueError("cannot capture hidden states of an empty sample")
        device = self.device
        longest = max(lengths)
        ids = torch.zeros(len(input_ids), longest, dtype=torch.long)
        attention = torch.zeros(len(input_ids), longest, dtype=torch.long)
        for row, t in enumerate(input_ids):
            ids[row, : lengths[row]] = t.reshape(-1).long()
            attention[row, : lengths[row]] = 1
        with StateRecorder(self.model, self.spec, stop_early=True) as recorder:
            recorder.run(
                self.decoder,
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                use_cache=False,
            )
            stacked = recorder.take()  # [B, longest, n, H]
        if not keep_on_device:
            stacked = stacked.cpu()
        return [stacked[row, : lengths[row]] for row in range(len(input_ids))]

    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[L, n, H]`` of one sample."""
        return self.capture_batch([input_ids])[0]
