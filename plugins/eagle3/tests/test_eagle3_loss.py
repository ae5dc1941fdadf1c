"""Next-token alignment and the per-step loss/metrics, against plain-loop derivations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from speculators_eagle3.alignment import align_batch
from speculators_eagle3.loss import ttt_loss

from speculators_core.modeling import shift_left
from speculators_core.train.metrics import derive_metrics


def unshifted_batch() -> dict[str, torch.Tensor]:
    """Two rows: three documents then padding, and one document filling the row."""
    generator = torch.Generator().manual_seed(0)
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0], list(range(10))])
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1, 1, 1]])
    return {
        "input_ids": torch.randint(0, 50, (2, 10), generator=generator),
        "hidden_states": torch.randn(2, 10, 4, 3, generator=generator),
        "loss_mask": mask,
        "position_ids": positions,
        "document_ids": docs,
    }


def test_alignment_matches_plain_loop() -> None:
    """Index t holds x_{t+1}, g_t, y_{t+1}, l_{t+1}, p_t + 1 inside a document; -1 at its end."""
    batch = unshifted_batch()
    aligned = align_batch(**batch)
    rows, length = batch["input_ids"].shape
    for b in range(rows):
        for t in range(length):
            doc = int(batch["document_ids"][b, t])
            has_next = t + 1 < length and doc >= 0 and int(batch["document_ids"][b, t + 1]) == doc
            assert int(aligned.document_ids[b, t]) == (doc if has_next else -1)
            assert int(aligned.position_ids[b, t]) == int(batch["position_ids"][b, t]) + 1
            expected_aux = batch["hidden_states"][b, t, :3].reshape(-1)
            assert torch.equal(aligned.aux_hidden_states[b, t], expected_aux)
            if has_next:
                assert int(aligned.input_ids[b, t]) == int(batch["input_ids"][b, t + 1])
                assert torch.equal(
                    aligned.last_hidden_states[b, t], batch["hidden_states"][b, t + 1, 3]
                )
                assert bool(aligned.loss_mask[b, t]) == bool(batch["loss_mask"][b, t + 1])
            else:
                assert not bool(aligned.loss_mask[b, t])


def test_shift_left() -> None:
    """``shift_left`` moves entries left along dim 1 and fills the tail."""
    x = torch.arange(6).reshape(1, 6)
    assert shift_left(x, 2, fill=-1).tolist() == [[2, 3, 4, 5, -1, -1]]
    assert shift_left(x, 0) is x


def plain_loop_loss(
    step_logits: list[torch.Tensor],
    targets: torch.Tensor,
    docs: torch.Tensor,
    mask: torch.Tensor,
    decay: float,
    divergence: Any = None,
) -> dict[str, float]:
    """FORMAT.md 3.3 per position: KL(p_{t+s} || q_t) (or ``divergence(p, q)`` of the two
    probability lists), chains of correct argmaxes, counts."""
    rows, length, vocab = targets.shape
    out: dict[str, float] = {}
    total = 0.0
    accept_len = 1.0
    chain = {(b, t): True for b in range(rows) for t in range(length)}
    for step, logits in enumerate(step_logits):
        kl_sum, count, hits, survived = 0.0, 0, 0, 0
        for b in range(rows):
            for t in range(length):
                u = t + step
                valid = (
                    u < length
                    and int(docs[b, t]) >= 0
                    and int(docs[b, u]) == int(docs[b, t])
                    and bool(mask[b, u])
                )
                if u < length:
                    correct = int(logits[b, t].argmax()) == int(targets[b, u].argmax())
                else:
                    correct = False
                was_alive = chain[(b, t)]
                chain[(b, t)] = was_alive and correct
                if not valid:
                    continue
                p = torch.softmax(targets[b, u].double(), dim=0)
                log_q = torch.log_softmax(logits[b, t].double(), dim=0)
                if divergence is not None:
                    kl_sum += divergence(p.tolist(), log_q.exp().tolist())
                else:
                    kl_sum += sum(
                        float(p[v]) * (math.log(float(p[v])) - float(log_q[v]))
                        for v in range(vocab)
                    )
                count += 1
                hits += chain[(b, t)]
                survived += was_alive
        loss = decay**step * kl_sum / max(count, 1)
        total += loss
        out[f"loss_{step}"] = loss
        out[f"full_acc_{step}"] = hits / max(count, 1)
        out[f"cond_acc_{step}"] = hits / max(survived, 1)
        out[f"count_{step}"] = count
        out[f"survived_{step}"] = survived
        accept_len += hits / max(count, 1)
    out["loss"] = total
    out["est_accept_len"] = accept_len
    return out


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_ttt_loss_matches_plain_loop(decay: float) -> None:
    """Per-step losses, accuracies, the acceptance estimate and metric weights match the loop."""
    generator = torch.Generator().manual_seed(1)
    aligned = align_batch(**unshifted_batch())
    docs, mask = aligned.document_ids, aligned.loss_mask
    rows, length, vocab, steps = 2, 10, 7, 3
    targets = torch.randn(rows, length, vocab, generator=generator) * 3
    step_logits = []
    for step in range(steps):
        # Mostly agree with the target they are scored against, so chains survive a few steps.
        agree = shift_left(targets, step) + 0.3 * torch.randn(
            rows, length, vocab, generator=generator
        )
        noise = torch.randn(rows, length, vocab, generator=generator) * 3
        keep = torch.rand(rows, length, 1, generator=generator) < 0.8
        step_logits.append(torch.where(keep, agree, noise))
    out = derive_metrics(ttt_loss(step_logits, targets, docs, mask, step_loss_decay=decay))
    expected = plain_loop_loss(step_logits, targets, docs, mask, decay)
    assert 0 < expected["full_acc_2"] < expected["full_acc_0"] < 1  # a meaningful case
    for key in ["loss", "est_accept_len"] + [
        f"{kind}_{s}" for s in range(steps) for kind in ("loss", "full_acc", "cond_acc")
    ]:
        assert out.metrics[key].item() == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    for s in range(steps):
        assert int(out.weights[f"loss_{s}"]) == expected[f"count_{s}"]
        assert int(out.weights[f"full_acc_{s}"]) == expected[f"count_{s}"]
        assert int(out.weights[f"cond_acc_{s}"]) == expected[f"survived_{s}"]
    assert int(out.weights["loss"]) == expected["count_0"]
    assert int(out.weights["est_accept_len"]) == expected["count_0"]


def test_core_est_accept_len_is_what_eagle3_reported_before() -> None:
    """The core's est_accept_len is bit-identical to the plugin's former in-loss sum."""
    generator = torch.Generator().manual_seed(3)
    aligned = align_batch(**unshifted_batch())
    targets = torch.randn(2, 10, 7, generator=generator)
    step_logits = [
        shift_left(targets, s) + torch.randn(2, 10, 7, generator=generator) for s in range(4)
    ]
    out = ttt_loss(step_logits, targets, aligned.document_ids, aligned.loss_mask)
    assert "est_accept_len" not in out.metrics  # the plugin leaves it to the core
    # What ttt_loss_rows computed until the core took it over: a float32 running sum from 1.
    before = torch.ones(())
    for step in range(4):
        before = before + out.metrics[f"full_acc_{step}"]
    derived = derive_metrics(out)
    assert torch.equal(derived.metrics["est_accept_len"], before.float())
    assert torch.equal(derived.weights["est_accept_len"], out.weights["full_acc_0"])


def test_ttt_loss_backpropagates_and_handles_empty_masks() -> None:
    """The loss has a gradient; with nothing supervised it is zero, not NaN."""
    logits = torch.randn(1, 4, 5, requires_grad=True)
    targets = torch.randn(1, 4, 5)
    docs = torch.zeros(1, 4, dtype=torch.long)
    out = ttt_loss([logits], targets, docs, torch.ones(1, 4, dtype=torch.bool))
    out.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    empty = ttt_loss([logits], targets, docs, torch.zeros(1, 4, dtype=torch.bool))
    assert empty.loss.item() == 0.0
    assert not any(torch.isnan(v) for v in empty.metrics.values())


def test_ttt_loss_scores_each_step_with_the_chosen_objective() -> None:
    """A weighted mix (2 x TV + 0.5 x CE on the verifier's token) in place of forward KL: every
    step's loss is the plain loop with that divergence per scored position."""
    from speculators_core import PluginHost
    from speculators_core.objectives import resolve_objective

    generator = torch.Generator().manual_seed(3)
    aligned = align_batch(**unshifted_batch())
    docs, mask = aligned.document_ids, aligned.loss_mask
    targets = torch.randn(2, 10, 7, generator=generator) * 2
    step_logits = [torch.randn(2, 10, 7, generator=generator) * 2 for _ in range(2)]

    def mix(p: list[float], q: list[float]) -> float:
        tv = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
        star = max(range(len(p)), key=p.__getitem__)
        return 2 * tv + 0.5 * -math.log(q[star])

    objective = resolve_objective("tv=2,ce=0.5", PluginHost())
    out = ttt_loss(step_logits, targets, docs, mask, step_loss_decay=0.7, objective=objective)
    expected = plain_loop_loss(step_logits, targets, docs, mask, 0.7, divergence=mix)
    for key in ("loss", "loss_0", "loss_1"):
        assert float(out.metrics[key]) == pytest.approx(expected[key], rel=1e-5), key
    # The default (no objective) is forward KL: the same plain loop without a divergence.
    plain = ttt_loss(step_logits, targets, docs, mask)
    assert float(plain.loss) == pytest.approx(
        plain_loop_loss(step_logits, targets, docs, mask, 1.0)["loss"], rel=1e-5
    )
