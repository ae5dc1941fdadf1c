"""What an algorithm needs from the verifier: which hidden states, with which semantics."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HiddenStateSpec"]


@dataclass(frozen=True)
class HiddenStateSpec:
    """The verifier hidden states an algorithm trains and drafts from.

    ``layer_ids`` use vLLM's semantics (FORMAT.md 2.7): id ``k`` is the residual stream
    *entering* decoder layer ``k`` (``hidden_states + residual`` in vLLM; transformers'
    ``output_hidden_states[k]``, where 0 is the embeddings); id ``N`` (the number of decoder
    layers) is the final decoder output **before** the final norm. With ``post_norm_last`` the
    verifier's final norm is applied to the last listed id, which must then be ``N`` (the
    post-norm feature EAGLE-1/HASS use).

    Captured states are stored and batched as ``[tokens, len(layer_ids), hidden]`` in this
    order.

    Examples: EAGLE-3 on a 30-layer verifier asks for ``(2, 15, 27, 30)`` (three aux states plus
    the final pre-norm state for its training targets); EAGLE-1/HASS asks for ``(30,)`` with
    ``post_norm_last=True``.
    """

    layer_ids: tuple[int, ...]
    post_norm_last: bool = False

    def validate(self, num_layers: int) -> None:
        """Raise ValueError if an id is outside ``0..num_layers`` or the spec is inconsistent."""
        if not self.layer_ids:
            raise ValueError("hidden-state spec lists no layer ids")
        bad = [i for i in self.layer_ids if not 0 <= i <= num_layers]
        if bad:
            raise ValueError(
                f"hidden-state layer ids {bad} are outside 0..{num_layers} for a verifier with "
                f"{num_layers} layers"
            )
        if self.post_norm_last and self.layer_ids[-1] != num_layers:
            raise ValueError(
                f"post_norm_last needs the last layer id to be {num_layers} (the final layer), "
                f"got {self.layer_ids[-1]}"
            )

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (stored in data manifests)."""
        return {"layer_ids": list(self.layer_ids), "post_norm_last": self.post_norm_last}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> HiddenStateSpec:
        """Inverse of :meth:`to_json`."""
        ids = data.get("layer_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"hidden-state spec needs a list of integer layer_ids, got {ids!r}")
        return cls(layer_ids=tuple(ids), post_norm_last=bool(data.get("post_norm_last", False)))
