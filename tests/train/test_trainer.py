"""The training loop: exact gradients over micro-batches, validation, caps, final artefact."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from train_samples import random_samples, verifier_samples

from speculators_core.loading import load_speculator
from speculators_core.train import (
    DataError,
    FeatureShape,
    InMemorySource,
    Piece,
    Trainer,
    TrainingArguments,
    collate_rows,
    list_checkpoints,
)

QUIET = {"progress": False, "console_log": False}


def _draft(host, verifier, seed=0):
    torch.manual_seed(seed)
    return host.algorithm("fixture-mlp").model_class.from_verifier(verifier)


@pytest.mark.parametrize(("rows", "accum"), [(4, 1), (2, 2), (1, 4)])
def test_one_step_is_plain_sgd_on_the_whole_global_batch(
    host, small_verifier, tmp_path, rows, accum
):
    """However the global batch is split, the update is -lr * grad of its loss as one batch."""
    seq_len, lr = 24, 0.5
    samples = verifier_samples(small_verifier, 4, seed=1, min_len=seq_len, max_len=seq_len)
    model = _draft(host, small_verifier)
    reference = copy.deepcopy(model)

    # Independent derivation: one batch of all four rows, autograd, one SGD step.
    batch = collate_rows(
        [[Piece(i, 0, seq_len)] for i in range(4)],
        InMemorySource(samples),
        seq_len,
        FeatureShape(1, 32, torch.float32),
    )
    reference.training_step(batch).loss.backward()
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters()}

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_epochs=1,
        seq_len=seq_len,
        micro_batch_rows=rows,
        grad_accum_steps=accum,
        shuffle=False,
        val_fraction=0.0,
        optimizer="sgd",
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler="constant",
        warmup_steps=0,
        max_grad_norm=None,
        save_per_epoch=False,
        **QUIET,
    )
    result = Trainer(model, args, InMemorySource(samples), host=host).train()
    assert result.state.global_step == 1
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_validation_metrics_equal_a_direct_evaluation(host, small_verifier, tmp_path):
    """val_loss/val_acc at the end equal the final weights' loss on all validation rows at once."""
    seq_len = 20
    train = verifier_samples(small_verifier, 8, seed=2, min_len=seq_len, max_len=seq_len)
    val = verifier_samples(small_verifier, 3, seed=3, min_len=seq_len, max_len=seq_len)
    model = _draft(host, small_verifier)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), num_epochs=2, seq_len=seq_len, learning_rate=1e-2, **QUIET
    )
    result = Trainer(
        model, args, InMemorySource(train), val_data=InMemorySource(val), host=host
    ).train()

    batch = collate_rows(
        [[Piece(i, 0, seq_len)] for i in range(3)],
        InMemorySource(val),
        seq_len,
        FeatureShape(1, 32, torch.float32),
    )
    model.eval()
    with torch.no_grad():
        out = model.training_step(batch)
    assert result.metrics["val_loss"] == pytest.approx(float(out.loss), rel=1e-6)
    assert result.metrics["val_acc"] == pytest.approx(float(out.metrics["acc"]), rel=1e-6)
    last_val = [r for r in result.state.log_history if "val_loss" in r][-1]
    assert last_val["step"] == result.state.global_step


def test_final_folder_is_a_loadable_speculator_with_the_trained_weights(
    host, small_verifier, tmp_path
):
    """<output>/final loads with SpeculatorModel.from_pretrained and holds the last weights."""
    samples = random_samples(16, hidden=32, vocab=256, seed=4)
    model = _draft(host, small_verifier)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), seq_len=32, num_epochs=2, **QUIET)
    result = Trainer(model, args, InMemorySource(samples), host=host).train()
    assert result.final_dir == tmp_path / "run" / "final"
    loaded = load_speculator(result.final_dir, host=host)
    assert type(loaded) is type(model)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_max_steps_stops_inside_an_epoch_with_a_final_validation_and_checkpoint(
    host, small_verifier, tmp_path
):
    """A step cap ends the run mid-epoch; the last step is validated and checkpointed."""
    samples = random_samples(40, hidden=32, vocab=256, seed=5, min_len=10, max_len=16)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), seq_len=16, num_epochs=3, max_steps=5, **QUIET
    )
    trainer = Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host)
    assert trainer.plan.steps_in_epoch(0) > 5
    result = trainer.train()
    state = result.state
    assert (state.global_step, state.max_steps, state.epoch, state.step_in_epoch) == (5, 5, 0, 5)
    assert [s for s, _ in list_checkpoints(args.output_dir)] == [5]
    assert any("val_loss" in r and r["step"] == 5 for r in state.log_history)


def test_checkpoint_rotation_keeps_the_last_k_and_the_best(host, small_verifier, tmp_path):
    """With save_total_limit=2, the newest two checkpoints and the best validated one remain."""
    samples = random_samples(30, hidden=32, vocab=256, seed=6, min_len=12, max_len=16)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        seq_len=16,
        num_epochs=1,
        save_every=1,
        eval_every=1,
        save_total_limit=2,
        metric_for_best="val_loss",
        greater_is_better=True,  # the worst loss "wins", so the best is not simply the newest
        learning_rate=5e-2,
        val_fraction=0.2,
        **QUIET,
    )
    result = Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host).train()
    evals = [(r["val_loss"], r["step"]) for r in result.state.log_history if "val_loss" in r]
    best_step = max(evals)[1]
    steps = result.state.global_step
    kept = {s for s, _ in list_checkpoints(args.output_dir)}
    assert kept == {steps - 1, steps, best_step}
    assert result.state.best_checkpoint == f"checkpoints/step-{best_step}"


def test_final_weights_best_copies_the_best_checkpoint(host, small_verifier, tmp_path):
    """final_weights='best' makes final/ the model of the best checkpoint."""
    samples = random_samples(30, hidden=32, vocab=256, seed=7, min_len=12, max_len=16)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        seq_len=16,
        num_epochs=3,
        greater_is_better=True,
        learning_rate=5e-2,
        save_total_limit=None,
        final_weights="best",
        **QUIET,
    )
    result = Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host).train()
    best = tmp_path / "run" / str(result.state.best_checkpoint) / "model" / "model.safetensors"
    final = load_file(result.final_dir / "model.safetensors")
    assert final.keys() == load_file(best).keys()
    assert all(torch.equal(final[k], v) for k, v in load_file(best).items())


def test_hidden_states_that_do_not_fit_the_draft_are_refused(host, small_verifier, tmp_path):
    """Two states per token for a draft that needs one: a one-line DataError at start-up."""
    samples = random_samples(4, hidden=32, vocab=256, seed=0, num_states=2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), seq_len=32)
    with pytest.raises(DataError, match=r"2 hidden state\(s\) per token but this draft needs 1"):
        Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host)


def test_empty_data_is_refused(host, small_verifier, tmp_path):
    """No samples: a clear error before anything else."""
    args = TrainingArguments(output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="no samples"):
        Trainer(_draft(host, small_verifier), args, InMemorySource([]), host=host)


def test_trains_from_a_real_store(host, small_verifier, store, tmp_path):
    """The shard store is a sample source as it is: a short run on it lowers the loss."""
    from speculators_core.data.store import ShardStore

    data = ShardStore.open(store)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        seq_len=256,
        num_epochs=2,
        learning_rate=5e-2,
        log_every=1,
        **QUIET,
    )
    result = Trainer(_draft(host, small_verifier), args, data, host=host).train()
    losses = [r["loss"] for r in result.state.log_history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
