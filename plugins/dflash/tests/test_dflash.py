"""DFlash: the block mask, D-PACE, training blocks against drafting, the loss, format and check."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest
import speculators_dflash.plugin as dflash_plugin
import torch
from dflash_helpers import AUX_IDS, packed_row
from safetensors.torch import load_file
from speculators_dflash import (
    DFlashDraftModel,
    DFlashSpeculatorConfig,
    block_attention_mask,
    position_weights,
)

from speculators_core import PluginHost, PluginSettings, SpeculatorsError, load_speculator
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_runner import speculative_config

HOST = PluginHost(
    PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:dflash", dflash_plugin)]
)


def perturbed(model: DFlashDraftModel, seed: int) -> DFlashDraftModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def build(verifier: Path, **options: Any) -> DFlashDraftModel:
    options.setdefault("aux_layer_ids", AUX_IDS)
    options.setdefault("block_size", 4)
    return DFlashDraftModel.from_verifier(verifier, **options)


# ------------------------------------------------------------------ the mask and the weights


@pytest.mark.parametrize("causal_block, window", [(False, None), (True, 3)])
def test_the_block_mask_is_the_rule_written_out(causal_block: bool, window: int | None) -> None:
    docs = torch.tensor([0] * 6 + [1] * 5 + [-1] * 2)
    anchors = torch.tensor([2, 5, 8, 10])
    size = 3
    got = block_attention_mask(docs, anchors, size, causal_block=causal_block, window=window)
    length = docs.shape[0]
    assert got.shape == (len(anchors) * size, length + len(anchors) * size)
    for q in range(len(anchors) * size):
        a = int(anchors[q // size])
        for k in range(got.shape[1]):
            if k < length:
                want = docs[k] == docs[a] and docs[a] >= 0 and k < a
                want = want and (window is None or k >= a - window)
            else:
                same = (k - length) // size == q // size
                want = same and (not causal_block or k - length <= q)
            assert bool(got[q, k]) == bool(want), (q, k)


def test_dpace_weights_are_the_formula_written_out() -> None:
    generator = torch.Generator().manual_seed(0)
    scored = torch.rand(5, 6, generator=generator) < 0.8
    scored[:, 0] = False
    confidence = torch.rand(5, 6, generator=generator)
    alpha = 0.3
    got = position_weights("dpace", scored, confidence, alpha=alpha)
    for block in range(5):
        m = [float(scored[block, i]) for i in range(6)]
        s = [(1 - alpha) * float(confidence[block, i]) + alpha if m[i] else 1.0 for i in range(6)]
        prefix = [math.prod(s[: i + 1]) for i in range(6)]
        for i in range(6):
            want = m[i] * sum(prefix[k] * m[k] for k in range(i, 6))
            assert got[block, i].item() == pytest.approx(want, rel=1e-5)
    exp = position_weights("exp", scored, confidence, gamma=2.0)
    assert exp[0, 1].item() in (0.0, 1.0)
    for i in range(1, 6):
        want = math.exp(-(i - 1) / 2.0) * float(scored[1, i])
        assert exp[1, i].item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ training against drafting


def test_every_training_block_is_what_drafting_proposes(tiny_verifier: Path, verifier_model: Any):
    """Slot i of anchor a in the one-forward training pass has the logits the drafting session
    gives for the i-th drafted token after verified position a - 1 (context keys cached)."""
    model = perturbed(build(tiny_verifier), 2)
    row = packed_row(verifier_model, [13], seed=3)
    anchors = torch.tensor([3, 6, 9])
    with torch.no_grad():
        h = model.block_states(
            row["hidden_states"][0, :, :3].flatten(1),
            row["input_ids"][0],
            row["position_ids"][0],
            row["document_ids"][0],
            anchors,
        )
        train_logits = model.lm_head(model.norm(h))  # [A, B, Vd]
    ids, states = row["input_ids"], row["hidden_states"]
    for j, anchor in enumerate(anchors.tolist()):
        session = model.draft_session()
        session.extend(ids[:, : anchor + 1], states[:, :anchor])
        proposal = session.propose(3)
        drafted = proposal.logits[0][:, model.draft_to_target_ids()]
        torch.testing.assert_close(drafted, train_logits[j, 1:], rtol=1e-4, atol=1e-5)
        assert torch.equal(proposal.tokens[0], proposal.logits[0].argmax(dim=-1))
    # extending in two calls caches the same context as one
    session = model.draft_session()
    session.extend(ids[:, :5], states[:, :4])
    session.propose(2)  # drafted block positions are dropped again
    session.extend(ids[:, 5:10], states[:, 4:9])
    again = session.propose(3).logits[0][:, model.draft_to_target_ids()]
    torch.testing.assert_close(again, train_logits[2, 1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("draft_vocab", [None, 64])
def test_draft_logits_is_the_first_drafted_token_after_every_position(
    tiny_verifier: Path, verifier_model: Any, draft_vocab: int | None
) -> None:
    """``draft_logits`` (what ``convert --validate`` compares) at position t is slot 1 of the
    block the drafting session runs after verified position t, on the verifier vocabulary."""
    vocab = verifier_model.config.vocab_size
    extra = {} if draft_vocab is None else {"token_counts": torch.arange(vocab).flip(0)}
    model = perturbed(build(tiny_verifier, draft_vocab_size=draft_vocab, **extra), 5)
    row = packed_row(verifier_model, [9], seed=4)
    ids, states = row["input_ids"], row["hidden_states"][:, :, :3]
    features = states.flatten(2).double()  # [1, T, n*Ht]
    length = ids.shape[1] - 1
    got = model.draft_logits(ids[:, 1:], features[:, :length])
    assert got.dtype == torch.float64 and got.shape == (1, length, model.config.verifier_vocab_size)
    for t in range(length):
        session = model.draft_session()
        session.extend(ids[:, : t + 2], states[:, : t + 1])
        want = session.propose(model.config.block_size - 1).logits[0, 0].double()
        assert torch.equal(torch.isinf(got[0, t]), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[0, t][finite], want[finite], rtol=1e-4, atol=1e-5)
    if draft_vocab is not None:
        assert int(torch.isfinite(got[0, 0]).sum()) == draft_vocab


def test_the_loss_is_the_weighted_ce_over_scored_slots(
    tiny_verifier: Path, verifier_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chosen anchors the loss is sum(w_i * CE_i) / N over slots whose token is supervised
    and in the anchor's document, CE against the verifier's own argmax, w by D-PACE; each
    draft distribution comes from the drafting session."""
    model = perturbed(build(tiny_verifier), 4)
    lengths = [9, 8]
    row = packed_row(verifier_model, lengths, seed=5, pad=2)
    anchors = torch.tensor([3, 6, 12, 14])
    monkeypatch.setattr(DFlashDraftModel, "choose_anchors", lambda self, *a: anchors)
    out = model.training_step(row)

    head, norm = verifier_model.lm_head.weight.detach(), verifier_model.model.norm
    ids, states, mask, docs = (
        row[k][0] for k in ("input_ids", "hidden_states", "loss_mask", "document_ids")
    )
    total, count = 0.0, 0
    for anchor in anchors.tolist():
        start = 0 if anchor < lengths[0] else lengths[0]
        session = model.draft_session()
        session.extend(ids[None, start : anchor + 1], states[None, start:anchor])
        logits = session.propose(3).logits[0]
        ces, scored = [0.0], [False]
        for i in range(1, 4):
            t = anchor + i
            ok = bool(t < len(ids) and docs[t] == docs[anchor] and mask[t])
            scored.append(ok)
            if not ok:
                ces.append(0.0)
                continue
            with torch.no_grad():
                verifier_token = int((head @ norm(states[t - 1, -1])).argmax())
            ces.append(-float(torch.log_softmax(logits[i - 1].double(), -1)[verifier_token]))
        s = [(0.5 * math.exp(-ce) + 0.5) if ok else 1.0 for ce, ok in zip(ces, scored)]
        prefix = [math.prod(s[: i + 1]) for i in range(4)]
        for i in range(1, 4):
            if scored[i]:
                weight = sum(prefix[k] * scored[k] for k in range(i, 4))
                total += weight * ces[i]
                count += 1
    assert count >= 6
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)
    assert {"loss_0", "full_acc_0", "full_acc_2", "cond_acc_1"} <= set(out.metrics)


def test_training_moves_the_draft_and_not_the_verifier_parts(tiny_verifier, verifier_model):
    model = build(tiny_verifier, max_anchors=4)
    model.train()
    model.training_step(packed_row(verifier_model, [12], seed=6)).loss.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn.k_norm.weight.grad is not None
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None


# ------------------------------------------------------------------ building, format, check


def test_from_verifier_records_what_vllm_reads(tiny_verifier: Path) -> None:
    model = build(tiny_verifier, block_size=5)
    config = model.config
    assert isinstance(config, DFlashSpeculatorConfig)
    assert config.speculators_model_type == "dflash" and config.block_size == 5
    assert config.aux_hidden_state_layer_ids == AUX_IDS
    assert isinstance(config.mask_token_id, int)
    assert config.sliding_window_non_causal is True and config.sample_from_anchor is False
    assert config.layer_config.model_type == "qwen3"
    assert config.speculators_config.default_proposal().speculative_tokens == 4
    with pytest.raises(SpeculatorsError, match="unknown dflash option"):
        build(tiny_verifier, ttt_steps=3)
    with pytest.raises(SpeculatorsError, match="block_size must be at least 2"):
        build(tiny_verifier, block_size=1)


def test_declared_options_match_from_verifier() -> None:
    params = {
        p.name: p.default
        for p in inspect.signature(DFlashDraftModel.from_verifier).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert {o.name: o.default for o in dflash_plugin.TRAINING_OPTIONS} == params
    assert [o.name for o in dflash_plugin.TRAINING_OPTIONS] == list(params)


@pytest.mark.parametrize("draft_vocab_size", [None, 100])
def test_round_trip_files_check_and_vllm_config(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path, draft_vocab_size: int | None
) -> None:
    vocab = json.loads((tiny_verifier / "config.json").read_text())["vocab_size"]
    extra = {} if draft_vocab_size is None else {"token_counts": torch.arange(vocab)}
    model = perturbed(build(tiny_verifier, draft_vocab_size=draft_vocab_size, **extra), 7)
    model.save_pretrained(tmp_path / "draft")
    tensors = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert "embed_tokens.weight" not in tensors and "verifier_lm_head.weight" not in tensors
    assert ("lm_head.weight" in tensors) == (draft_vocab_size is not None)
    assert ("d2t" in tensors) == (draft_vocab_size is not None)

    loaded = load_speculator(tmp_path / "draft", verifier=tiny_verifier, host=HOST).eval()
    assert type(loaded) is DFlashDraftModel
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded.configure_training(max_anchors=model.max_anchors)
    row = packed_row(verifier_model, [12], seed=8)
    torch.manual_seed(0)
    first = model.training_step(row).loss.item()
    torch.manual_seed(0)
    assert loaded.training_step(row).loss.item() == pytest.approx(first, rel=1e-6)

    report = check_checkpoint(tmp_path / "draft", host=HOST)
    assert report.findings == [], [str(f) for f in report.findings]
    assert speculative_config(tmp_path / "draft", 4, host=HOST) == {
        "method": "dflash",
        "model": str((tmp_path / "draft").resolve()),
        "num_speculative_tokens": 4,
    }
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    del config["mask_token_id"]
    config["sliding_window_non_causal"] = False
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    codes = check_checkpoint(tmp_path / "draft", host=HOST).codes
    assert {"dflash-mask-token", "dflash-causal-override"} <= set(codes), codes
