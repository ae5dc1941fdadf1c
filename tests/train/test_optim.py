"""Optimizer choice, weight-decay groups, the learning-rate schedule and metric combination."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from speculators_core.model import TrainingStepOutput
from speculators_core.train import TrainingArguments, TrainingConfigError
from speculators_core.train.metrics import WeightedSums
from speculators_core.train.optim import (
    MuonAdamW,
    build_optimizer,
    build_scheduler,
    optimizer_class,
)


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    return model


def test_optimizer_by_name_and_decay_groups():
    """Names are case-insensitive; matrices decay, vectors do not, frozen tensors are left out."""
    model = _model()
    args = TrainingArguments(optimizer="SGD", weight_decay=0.1, optimizer_kwargs={"momentum": 0.5})
    opt = build_optimizer(model, args)
    assert type(opt) is torch.optim.SGD
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight)}
    assert {id(p) for p in plain["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[2].bias),
    }
    assert decayed["momentum"] == 0.5


def test_adamw_betas_from_json_list():
    """JSON lists become the tuples torch expects."""
    opt = build_optimizer(_model(), TrainingArguments(optimizer_kwargs={"betas": [0.8, 0.9]}))
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_defaults_to_the_fused_kernel_with_foreachs_numbers(name: str) -> None:
    """Unnamed, Adam(W) on a CPU runs fused (no step-wide temporaries): three steps give what
    torch's default ``foreach`` gives, to the last bit or so; a named choice wins."""
    args = TrainingArguments(optimizer=name, learning_rate=1e-2, weight_decay=0.1)
    lean_model = _model()
    default_model, initial = copy.deepcopy(lean_model), copy.deepcopy(lean_model)
    lean = build_optimizer(lean_model, args)
    assert all(group["fused"] is True for group in lean.param_groups)
    named = TrainingArguments(optimizer=name, learning_rate=1e-2, weight_decay=0.1,
                              optimizer_kwargs={"foreach": True})  # fmt: skip
    default = build_optimizer(default_model, named)
    assert all(group["foreach"] is True and not group["fused"] for group in default.param_groups)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 4, generator=generator)
        for model, opt in ((lean_model, lean), (default_model, default)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(lean_model.parameters(), default_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(lean_model[0].weight, initial[0].weight)  # it did move


def test_unknown_optimizer_and_bad_kwargs_are_one_line_errors():
    """An unknown name lists the choices; rejected kwargs name the optimizer."""
    with pytest.raises(TrainingConfigError, match=r"unknown optimizer 'lion'.*adamw"):
        optimizer_class("lion")
    with pytest.raises(TrainingConfigError, match="rejects optimizer_kwargs"):
        build_optimizer(_model(), TrainingArguments(optimizer_kwargs={"nope": 1}))


class _Draftish(torch.nn.Module):
    """An embedding, two hidden matrices with biases, a norm and an LM head: Muon's cases."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.fc = torch.nn.Linear(6, 6)
        self.mlp = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.lm_head = torch.nn.Linear(6, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.mlp(torch.relu(self.fc(self.embed(ids))))))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 10, (4, 5), generator=generator)
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = _Draftish()
    opt = build_optimizer(model, TrainingArguments(optimizer="muon", weight_decay=0.1))
    assert isinstance(opt, MuonAdamW) and opt.muon is not None and opt.adamw is not None
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon == {id(model.fc.weight), id(model.mlp.weight)}
    decayed, plain = opt.adamw.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model.embed.weight), id(model.lm_head.weight)}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in plain["params"]} == {
        id(model.fc.bias), id(model.mlp.bias), id(model.norm.weight), id(model.norm.bias)
    }  # fmt: skip
    assert opt.param_groups == [*opt.muon.param_groups, *opt.adamw.param_groups]


def test_muon_steps_as_torch_muon_and_adamw_side_by_side_and_resumes_exactly():
    """Five scheduled steps of the combined optimizer equal torch's Muon (hidden matrices,
    RMS-matched learning rate) and AdamW (the rest) stepped separately; a state_dict saved
    after two steps and loaded into a fresh one continues identically."""
    args = TrainingArguments(optimizer="muon", learning_rate=0.02, weight_decay=0.1)
    torch.manual_seed(0)
    model = _Draftish()
    twin = _Draftish()
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, total_steps=5)
    matrices = [twin.fc.weight, twin.mlp.weight]
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(
        [
            {"params": [twin.embed.weight, twin.lm_head.weight], "weight_decay": 0.1},
            {"params": [twin.fc.bias, twin.mlp.bias, twin.norm.weight, twin.norm.bias],
             "weight_decay": 0.0},
        ],
        lr=0.02,
    )  # fmt: skip
    twin_scheds = [build_scheduler(o, args, total_steps=5) for o in (muon, adamw)]
    saved = None
    for step in range(5):
        for m, optimizers, schedulers in (
            (model, [opt], [sched]),
            (twin, [muon, adamw], twin_scheds),
        ):
            for o in optimizers:
                o.zero_grad()
            _loss(m, step).backward()
            for o, s in zip(optimizers, schedulers):
                o.step()
                s.step()
        if step == 1:
            saved = (
                {k: v.clone() for k, v in model.state_dict().items()},
                copy.deepcopy(opt.state_dict()),  # state_dict() holds the live tensors
                sched.state_dict(),
            )
        for name, param in model.named_parameters():
            assert torch.allclose(param, dict(twin.named_parameters())[name], atol=1e-6), (
                step,
                name,
            )

    # As the trainer resumes: build both, then load the optimizer and the schedule.
    resumed = _Draftish()
    resumed.load_state_dict(saved[0])
    again = build_optimizer(resumed, args)
    again_sched = build_scheduler(again, args, total_steps=5)
    again.load_state_dict(saved[1])
    again_sched.load_state_dict(saved[2])
    for step in range(2, 5):
        again.zero_grad()
        _loss(resumed, step).backward()
        again.step()
        again_sched.step()
    for name, param in resumed.named_parameters():
        assert torch.allclose(param, dict(model.named_parameters())[name], atol=1e-6), name


def test_muon_refuses_unknown_kwargs_in_one_line():
    with pytest.raises(TrainingConfigError, match="optimizer 'muon' rejects optimizer_kwargs"):
        build_optimizer(_Draftish(), TrainingArguments(optimizer="muon", optimizer_kwargs={"x": 1}))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_matches_the_formula(kind):
    """Warm-up then decay, computed independently here for every step."""
    total, warmup, peak, floor = 20, 4, 1e-2, 0.1
    args = TrainingArguments(
        learning_rate=peak, lr_scheduler=kind, warmup_steps=warmup, min_lr_ratio=floor
    )
    opt = build_optimizer(_model(), args)
    sched = build_scheduler(opt, args, total)
    for step in range(total + 1):
        if step < warmup:
            want = peak * (step + 1) / (warmup + 1)
        elif kind == "constant":
            want = peak
        else:
            p = (step - warmup) / (total - warmup)
            shape = 1 - p if kind == "linear" else 0.5 * (1 + math.cos(math.pi * p))
            want = peak * (floor + (1 - floor) * shape)
        assert opt.param_groups[0]["lr"] == pytest.approx(want), step
        opt.step()
        sched.step()


def test_warmup_ratio_rounds_up():
    """Without warmup_steps, warm-up is ceil(ratio * total) steps."""
    args = TrainingArguments(learning_rate=1.0, warmup_ratio=0.1, lr_scheduler="constant")
    opt = build_optimizer(_model(), args)
    build_scheduler(opt, args, 25)  # 2.5 -> 3 warm-up steps: lr 1/4 at step 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_weighted_sums_combine_micro_batches_exactly():
    """Averages weighted by their counts give the average over the union."""
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([4.0, 4.0])]
    sums = WeightedSums()
    for v in values:
        sums.add_output(
            TrainingStepOutput(
                loss=v.mean(),
                metrics={"acc": (v > 2).float().mean()},
                weights={"loss": torch.tensor(v.numel()), "acc": torch.tensor(v.numel())},
            )
        )
    everything = torch.cat(values)
    avg = sums.averages(prefix="val_")
    assert avg["val_loss"] == pytest.approx(float(everything.mean()))
    assert avg["val_acc"] == pytest.approx(float((everything > 2).float().mean()))


def test_weighted_sums_default_weight_and_zero_weight():
    """A metric without a weight counts once; a metric with zero total weight is omitted."""
    sums = WeightedSums()
    sums.add_output(TrainingStepOutput(loss=torch.tensor(2.0), metrics={"x": torch.tensor(1.0)}))
    sums.add_output(TrainingStepOutput(loss=torch.tensor(4.0), metrics={"x": torch.tensor(3.0)}))
    sums.add("empty", 5.0, 0.0)
    assert sums.averages() == {"loss": 3.0, "x": 2.0}
