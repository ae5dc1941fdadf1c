"""Captured hidden states equal a separate plain forward; batched equals unbatched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datatest_support import CHATS

from speculators_core.data.capture import HiddenStateCapture, plan_batches
from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import normalize_record
from speculators_core.data.errors import VerifierError
from speculators_core.features import HiddenStateSpec
from speculators_core.testing import make_tiny_verifier


def reference_states(model, ids: torch.Tensor, layer_ids, post_norm_last=False) -> torch.Tensor:
    """``[L, n, H]`` from one unbatched ``output_hidden_states`` forward of the causal LM.

    The pre-norm final state (id N) is taken from a forward hook on the *last decoder layer's
    output*, independently of the capture code (which reads the final norm's input), and the
    test checks that the final norm of it is transformers' ``hidden_states[N]``.
    """
    layers = model.model.layers
    n = len(layers)
    grabbed: dict[str, torch.Tensor] = {}
    handle = layers[-1].register_forward_hook(
        lambda _m, _a, out: grabbed.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    handle.remove()
    pre_norm = grabbed["last"][0]
    post_norm = out.hidden_states[n][0]
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(pre_norm), post_norm)
    states = []
    for pos, k in enumerate(layer_ids):
        if k < n:
            states.append(out.hidden_states[k][0])
        elif post_norm_last and pos == len(layer_ids) - 1:
            states.append(post_norm)
        else:
            states.append(pre_norm)
    return torch.stack(states, dim=1)


def sample_ids(renderer: ChatRenderer) -> list[torch.Tensor]:
    return [torch.tensor(renderer(normalize_record(c)).input_ids) for c in CHATS]


@pytest.fixture(scope="module")
def tiny_capture(tiny_verifier: Path) -> HiddenStateCapture:
    return HiddenStateCapture.from_verifier(tiny_verifier, HiddenStateSpec((0, 1, 3, 4)))


@pytest.mark.parametrize(
    ("layer_ids", "post_norm_last"),
    [((0, 1, 3, 4), False), ((1, 2), False), ((4,), True), ((2, 4, 4), True)],
    ids=["aux+pre-norm", "aux-only", "post-norm", "pre-and-post"],
)
def test_tiny_llama_states_equal_plain_forward(
    tiny_capture, tiny_verifier, layer_ids, post_norm_last
):
    """Every spec shape equals the reference; unbatched and batched alike."""
    capture = HiddenStateCapture(tiny_capture.model, HiddenStateSpec(layer_ids, post_norm_last))
    renderer = ChatRenderer.from_verifier(tiny_verifier)
    ids = sample_ids(renderer)
    batched = capture.capture_batch(ids)
    for t, got in zip(ids, batched, strict=True):
        ref = reference_states(capture.model, t, layer_ids, post_norm_last)
        assert got.shape == (t.numel(), len(layer_ids), 64)
        torch.testing.assert_close(capture.capture(t), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_tiny_qwen3_states_equal_plain_forward(tmp_path: Path):
    """Another architecture (Qwen3: q/k norms) goes through the same hooks."""
    folder = make_tiny_verifier(tmp_path / "qwen", model_type="qwen3")
    capture = HiddenStateCapture.from_verifier(folder, HiddenStateSpec((1, 2, 4)))
    ids = sample_ids(ChatRenderer.from_verifier(folder))
    for t, got in zip(ids, capture.capture_batch(ids), strict=True):
        torch.testing.assert_close(
            got, reference_states(capture.model, t, (1, 2, 4)), rtol=1e-4, atol=1e-4
        )


def test_invalid_layer_ids_are_one_line_errors(tiny_capture):
    """Ids beyond N, or post-norm on a non-final id, are refused before any forward."""
    with pytest.raises(VerifierError, match=r"outside 0\.\.4"):
        HiddenStateCapture(tiny_capture.model, HiddenStateSpec((2, 9)))
    with pytest.raises(VerifierError, match="post_norm_last needs the last layer id to be 4"):
        HiddenStateCapture(tiny_capture.model, HiddenStateSpec((2,), post_norm_last=True))


def test_plan_batches_covers_every_sample_once():
    """Batches respect both caps and partition the indices."""
    lengths = [5, 30, 7, 30, 2, 9, 11]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=40)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40


@pytest.mark.slow
def test_smollm2_states_equal_plain_forward(smollm2: Path):
    """Real SmolLM2, EAGLE-3 ids (2, 15, 27, 30): batched and unbatched equal the reference."""
    spec = HiddenStateSpec((2, 15, 27, 30))
    capture = HiddenStateCapture.from_verifier(smollm2, spec)
    ids = sample_ids(ChatRenderer.from_verifier(smollm2))[:3]
    batched = capture.capture_batch(ids)
    for t, got in zip(ids, batched, strict=True):
        ref = reference_states(capture.model, t, spec.layer_ids)
        # SmolLM2's residual stream reaches ~2e4 in the middle layers: compare relative to it.
        scale = ref.abs().amax(dim=(0, 2), keepdim=True)
        assert ((capture.capture(t) - ref).abs() / scale).max() < 1e-5
        assert ((got - ref).abs() / scale).max() < 1e-4
