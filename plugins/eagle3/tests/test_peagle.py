"""P-EAGLE: COD sampling, the element mask, training against drafting, format and check rules."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import speculators_eagle3.peagle as peagle
import speculators_eagle3.plugin as eagle3_plugin
import torch
from eagle3_helpers import AUX_IDS, pack_rows, random_samples
from safetensors.torch import load_file, save_file
from speculators_eagle3.alignment import align_batch
from speculators_eagle3.config import PEagleSpeculatorConfig
from speculators_eagle3.peagle import (
    PEagleDraftModel,
    cod_sample,
    peagle_attention_mask,
    resolve_mask_token_id,
)

from speculators_core import PluginHost, PluginSettings, SpeculatorsError, load_speculator
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_runner import speculative_config

HOST = PluginHost(
    PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:eagle3", eagle3_plugin)]
)
STATES = [*AUX_IDS, 4]  # the aux states and the final one of the 4-layer tiny verifier


def perturbed(model: PEagleDraftModel, seed: int) -> PEagleDraftModel:
    """The model with every trainable weight moved off its initialization (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


# ------------------------------------------------------------------ COD sampling and the mask


def test_cod_sampling_keeps_whole_chains_of_supervised_targets() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(200, generator=generator) < 0.7
    mask[:10] = False
    anchors, depths = cod_sample(mask, num_depths=6, max_anchors=None, generator=generator)
    assert torch.equal(anchors[depths == 0], torch.arange(200))
    elements = {(int(a), int(d)) for a, d in zip(anchors, depths, strict=True)}
    assert len(elements) == len(anchors)  # no element twice
    seeds = int(mask.sum())
    for depth in range(1, 6):
        here = anchors[depths == depth]
        assert torch.equal(here, here.sort().values)
        assert len(here) <= int((seeds - depth) * max(0.7**depth, 0.2))
        for anchor in here.tolist():
            assert (anchor, depth - 1) in elements  # the chain below it is there
            assert mask[anchor + depth]  # it predicts a supervised token
            assert anchor + depth < 200


def test_cod_sampling_sizes_follow_the_geometric_schedule() -> None:
    """With every index supervised the pool never runs short: the sizes are the formula's."""
    mask = torch.ones(300, dtype=torch.bool)
    _, depths = cod_sample(
        mask, num_depths=8, ratio=0.7, ratio_min=0.2, max_anchors=100,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    counts = torch.bincount(depths).tolist()
    want = [300] + [int((100 - d) * max(0.7**d, 0.2)) for d in range(1, 8)]
    assert counts == want


def test_the_element_mask_is_the_rule_written_out() -> None:
    generator = torch.Generator().manual_seed(2)
    docs = torch.tensor([0] * 7 + [1] * 6 + [-1] * 3)
    mask = docs >= 0
    anchors, depths = cod_sample(mask, num_depths=4, max_anchors=None, generator=generator)
    got = peagle_attention_mask(anchors, depths, docs)
    n = len(anchors)
    for q in range(n):
        for k in range(n):
            aq, dq, ak, dk = (int(anchors[q]), int(depths[q]), int(anchors[k]), int(depths[k]))
            same = docs[aq] == docs[ak] and docs[aq] >= 0
            sees = same and ((dk == 0 and ak <= aq) or (ak == aq and dk <= dq))
            assert bool(got[q, k]) == (sees or q == k), (q, k)


# ------------------------------------------------------------------ building


def test_from_verifier_records_the_mask_token_and_refuses_eagle3_only_options(
    tiny_verifier: Path,
) -> None:
    model = PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, num_depths=5)
    assert isinstance(model.config, PEagleSpeculatorConfig)
    assert model.config.speculators_model_type == "peagle"
    assert model.config.mask_token_id == resolve_mask_token_id(tiny_verifier, 259)
    assert model.config.embed_requires_grad and model.embed_tokens.weight.requires_grad
    assert model.mask_hidden.shape == (1, 1, 3 * model.config.aux_hidden_size)
    spec = model.config.speculators_config
    assert spec.algorithm == "peagle" and spec.default_proposal().speculative_tokens == 5
    with pytest.raises(SpeculatorsError, match="ttt_steps is an EAGLE-3 option"):
        PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, ttt_steps=2)
    with pytest.raises(SpeculatorsError, match="vLLM ignores fc_norm"):
        PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, fc_norm=True)
    with pytest.raises(SpeculatorsError, match="mask_token_id 999 is not a token id"):
        PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, mask_token_id=999)


# ------------------------------------------------------------------ training against drafting


def _one_document(verifier_model: Any, length: int, seed: int) -> dict[str, torch.Tensor]:
    return pack_rows(random_samples(verifier_model, STATES, [length], seed=seed), length)


def test_every_training_element_is_what_drafting_proposes(
    tiny_verifier: Path, verifier_model: Any
) -> None:
    """Element (a, d) of the one-forward training pass has the logits the drafting session
    gives for the d-th drafted token after verified position a (KV cache, mask slots)."""
    model = perturbed(
        PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, noise_std=0.0), 3
    )
    batch = _one_document(verifier_model, 14, seed=4)
    aligned = align_batch(**batch)
    length, depth_count = aligned.input_ids.shape[1], 4
    anchors = torch.cat(
        [torch.arange(length)] + [torch.arange(length - d) for d in range(1, depth_count)]
    )
    depths = torch.cat(
        [torch.zeros(length, dtype=torch.long)]
        + [torch.full((length - d,), d) for d in range(1, depth_count)]
    )
    with torch.no_grad():
        h = model.element_states(
            aligned.aux_hidden_states[0], aligned.input_ids[0], aligned.position_ids[0],
            aligned.document_ids[0], anchors, depths,
        )  # fmt: skip
        train_logits = model.lm_head(model.norm(h))
    ids, states = batch["input_ids"], batch["hidden_states"]
    for anchor in (0, 3, 8):
        session = model.draft_session()
        session.extend(ids[:, : anchor + 2], states[:, : anchor + 1])
        proposal = session.propose(depth_count)
        for depth in range(depth_count):
            element = int(((anchors == anchor) & (depths == depth)).nonzero())
            drafted = proposal.logits[0, depth][model.draft_to_target_ids()]
            torch.testing.assert_close(drafted, train_logits[element], rtol=1e-4, atol=1e-5)
        assert proposal.tokens.shape == (1, depth_count)
        assert torch.equal(proposal.tokens[0], proposal.logits[0].argmax(dim=-1))


def test_the_loss_is_the_mean_kl_over_scored_elements(
    tiny_verifier: Path, verifier_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chosen elements, the training loss is the plain mean of KL(verifier || draft) over
    the elements whose target lies in their document and is supervised, each derived from the
    drafting session and the verifier's own head."""
    model = perturbed(
        PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, noise_std=0.0), 5
    )
    samples = random_samples(verifier_model, STATES, [9, 8], seed=6)
    batch = pack_rows(samples, 17)
    chosen = (
        torch.tensor([*range(16), 2, 5, 7, 10, 2, 5]),
        torch.tensor([0] * 16 + [1] * 4 + [2] * 2),
    )
    monkeypatch.setattr(peagle, "cod_sample", lambda *args, **kwargs: chosen)
    out = model.training_step(batch)

    head = verifier_model.lm_head.weight.detach()
    norm = verifier_model.model.norm
    want: list[float] = []
    for anchor, depth in zip(*chosen, strict=True):
        a, d = int(anchor), int(depth)
        sample, start = (0, 0) if a < 8 else (1, 9)  # aligned rows: 8 + 8 indices
        local = a - start
        sample_ids = samples[sample]["input_ids"]
        if local + d >= len(sample_ids) - 1 or not samples[sample]["loss_mask"][local + d + 1]:
            continue  # the target leaves the document or is not supervised
        session = model.draft_session()
        states = samples[sample]["hidden_states"][None]
        session.extend(sample_ids[None, : local + 2], states[:, : local + 1])
        q = torch.log_softmax(session.propose(d + 1).logits[0, d].double(), dim=-1)
        final = states[0, local + d + 1, -1]  # the verifier's last state before its token
        with torch.no_grad():
            target = head @ norm(final)
        p = torch.softmax(target.double(), dim=-1)
        want.append(sum(float(p[i] * (math.log(p[i]) - q[i])) for i in range(len(p))))
    assert len(want) > 10
    assert out.loss.item() == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert set(out.metrics) >= {"loss_0", "loss_1", "loss_2", "full_acc_2", "cond_acc_1"}


def test_training_moves_every_trained_weight(tiny_verifier: Path, verifier_model: Any) -> None:
    model = PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS, num_depths=3)
    model.train()
    out = model.training_step(_one_document(verifier_model, 16, seed=7))
    out.loss.backward()
    assert model.mask_hidden.grad is not None and model.mask_hidden.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad is not None
    mask_row = model.embed_tokens.weight.grad[model.config.mask_token_id]
    assert mask_row.abs().sum() > 0  # the mask token's embedding learns
    assert model.lm_head.weight.grad is None  # frozen, as upstream


@pytest.mark.parametrize("objective", ["kl", "kl=0.6,tv=0.4"])
def test_frozen_head_loss_equals_scoring_the_logits(
    tiny_verifier: Path, verifier_model: Any, monkeypatch: pytest.MonkeyPatch, objective: str
) -> None:
    """A frozen LM head scores the elements' states through the head chunk by chunk
    (``head_objective``); a trainable one scores whole logits: the same loss, metrics and
    gradients of every other weight."""
    import speculators_core.head_loss as head_loss

    monkeypatch.setattr(head_loss, "HEAD_CHUNK_ELEMENTS", 5 * 256)  # chunks of a few rows
    frozen = perturbed(
        PEagleDraftModel.from_verifier(
            tiny_verifier, aux_layer_ids=AUX_IDS, noise_std=0.0, objective=objective
        ),
        8,
    )
    trained = copy.deepcopy(frozen)
    trained.configure_training(train_lm_head=True)
    batch = pack_rows(random_samples(verifier_model, STATES, [12, 9], seed=9), 21)
    torch.manual_seed(3)
    aligned = align_batch(**batch)
    docs = aligned.document_ids[0]
    used = int((docs >= 0).nonzero().max()) + 1  # the step trims the padding after this
    mask = aligned.loss_mask[0, :used].bool() & (docs[:used] >= 0)
    elements = cod_sample(mask, num_depths=3)
    monkeypatch.setattr(peagle, "cod_sample", lambda *args, **kwargs: elements)
    results = []
    for model in (frozen, trained):
        out = model.training_step(batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert a.metrics[key].item() == pytest.approx(b.metrics[key].item(), rel=1e-5, abs=1e-6)
    del grads_b["lm_head.weight"]
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ format, check, vLLM


def test_round_trip_check_and_vllm_config(
    tiny_verifier: Path, verifier_model: Any, tmp_path: Path
) -> None:
    vocab = json.loads((tiny_verifier / "config.json").read_text())["vocab_size"]
    model = perturbed(
        PEagleDraftModel.from_verifier(
            tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=128,
            token_counts=torch.arange(vocab), num_depths=3, noise_std=0.0,
        ),
        8,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "draft")
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle"
    assert config["mask_token_id"] == model.config.mask_token_id
    assert config["norm_before_residual"] is True  # always written (vLLM's peagle default is false)
    tensors = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert tensors["mask_hidden"].shape == (1, 1, 3 * model.config.aux_hidden_size)
    assert "verifier_lm_head.weight" not in tensors

    loaded = load_speculator(tmp_path / "draft", verifier=tiny_verifier, host=HOST).eval()
    assert type(loaded) is PEagleDraftModel
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded.configure_training(num_depths=3, noise_std=0.0)  # training settings are not saved
    batch = _one_document(verifier_model, 12, seed=9)
    torch.manual_seed(0)
    first = model.training_step(batch).loss
    torch.manual_seed(0)
    assert loaded.training_step(batch).loss.item() == pytest.approx(first.item(), rel=1e-6)

    report = check_checkpoint(tmp_path / "draft", host=HOST)
    assert report.findings == [], [str(f) for f in report.findings]
    assert speculative_config(tmp_path / "draft", 3, host=HOST) == {
        "method": "eagle3",
        "model": str((tmp_path / "draft").resolve()),
        "num_speculative_tokens": 3,
        "parallel_drafting": True,
    }

    del config["mask_token_id"]
    config["fc_norm"] = True
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    del tensors["mask_hidden"]
    save_file(tensors, str(tmp_path / "draft" / "model.safetensors"), metadata={"format": "pt"})
    codes = check_checkpoint(tmp_path / "draft", host=HOST).codes
    assert {"peagle-mask-token", "peagle-fc-norm", "tensor-missing"} <= set(codes), codes
