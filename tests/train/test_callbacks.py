"""Training callbacks: the full ordered event list, control flow, the plugin hook, state."""

from __future__ import annotations

import json

import pytest
import torch
from train_samples import random_samples

from speculators_core.errors import PluginError
from speculators_core.plugins import PluginHost, PluginSettings, hookimpl
from speculators_core.train import (
    EVENTS,
    CallbackHandler,
    EarlyStoppingCallback,
    InMemorySource,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    TrainingConfigError,
    list_checkpoints,
)


class Recorder(TrainerCallback):
    """Records every event with the global step it saw."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []


for _event in EVENTS:

    def _record(self, args, state, control, _event=_event, **kwargs):
        self.events.append((_event, state.global_step))

    setattr(Recorder, _event, _record)


def _draft(host, verifier):
    torch.manual_seed(0)
    return host.algorithm("fixture-mlp").model_class.from_verifier(verifier)


def test_every_event_in_order_with_validation_checkpoints_and_early_stop(
    host, small_verifier, tmp_path
):
    """A recording callback sees exactly the ordered event list derived here step by step."""
    seq_len, rows, accum, epochs = 16, 2, 2, 4
    # Samples of exactly seq_len tokens: one sample per row, so the plan is known in advance.
    train = random_samples(12, hidden=32, vocab=256, seed=0, lengths=[seq_len] * 12)
    val = random_samples(3, hidden=32, vocab=256, seed=1, lengths=[seq_len] * 3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_epochs=epochs,
        seq_len=seq_len,
        micro_batch_rows=rows,
        grad_accum_steps=accum,
        log_every=2,
        save_every=2,
        save_per_epoch=True,
        save_total_limit=None,
        early_stopping_patience=1,
        early_stopping_threshold=1e9,  # nothing counts as an improvement: stop at the 2nd eval
        progress=False,
        console_log=False,
    )
    recorder = Recorder()
    trainer = Trainer(
        _draft(host, small_verifier),
        args,
        InMemorySource(train),
        val_data=InMemorySource(val),
        callbacks=[recorder],
        host=host,
    )
    result = trainer.train()

    steps_per_epoch = 12 // (rows * accum)  # 12 rows, 4 rows per optimizer step
    max_steps = steps_per_epoch * epochs
    expected: list[tuple[str, int]] = [("on_train_begin", 0)]
    step = 0
    for epoch in range(epochs):
        expected.append(("on_epoch_begin", step))
        for s in range(steps_per_epoch):
            expected.append(("on_step_begin", step))
            expected.append(("on_pre_optimizer_step", step))
            expected.append(("on_optimizer_step", step))
            step += 1
            expected.append(("on_step_end", step))
            if step % args.log_every == 0 or step == max_steps:
                expected.append(("on_log", step))
            last_of_epoch = s == steps_per_epoch - 1
            if step % args.save_every == 0 and not last_of_epoch:
                expected.append(("on_save", step))
        expected += [("on_epoch_end", step), ("on_log", step), ("on_evaluate", step)]
        expected.append(("on_save", step))
        if epoch == 1:  # second validation: no improvement, patience 1 exhausted
            break
    expected.append(("on_train_end", step))

    assert recorder.events == expected
    assert result.state.global_step == 2 * steps_per_epoch
    saved = [s for s, _ in list_checkpoints(args.output_dir)]
    assert saved == sorted({s for e, s in expected if e == "on_save"})
    assert (result.final_dir / "config.json").is_file()


class _Stopper(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True
        return control


def test_control_is_the_way_to_stop(host, small_verifier, tmp_path):
    """A callback that sets should_training_stop ends the run after the current step."""
    recorder = Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        seq_len=32,
        num_epochs=5,
        progress=False,
        console_log=False,
    )
    samples = random_samples(20, hidden=32, vocab=256, seed=0)
    trainer = Trainer(
        _draft(host, small_verifier),
        args,
        InMemorySource(samples),
        callbacks=[_Stopper(), recorder],
        host=host,
    )
    result = trainer.train()
    assert result.state.global_step == 2
    assert [e for e, _ in recorder.events][-2:] == ["on_step_end", "on_train_end"]
    assert "on_epoch_end" not in {e for e, _ in recorder.events}


class _EpochCutter(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_epoch_stop = state.step_in_epoch == 1
        return control


def test_should_epoch_stop_ends_only_the_epoch(host, small_verifier, tmp_path):
    """should_epoch_stop skips the rest of the epoch; the next epoch starts as usual."""
    recorder = Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        seq_len=32,
        num_epochs=3,
        progress=False,
        console_log=False,
    )
    samples = random_samples(20, hidden=32, vocab=256, seed=0)
    trainer = Trainer(
        _draft(host, small_verifier),
        args,
        InMemorySource(samples),
        callbacks=[_EpochCutter(), recorder],
        host=host,
    )
    assert trainer.plan.steps_in_epoch(0) > 1
    result = trainer.train()
    assert result.state.global_step == 3 and result.state.epoch == 3
    assert [s for e, s in recorder.events if e == "on_epoch_end"] == [1, 2, 3]


class _Alarm(TrainerCallback):
    def __init__(self, args):
        self.args = args


class _AlarmPlugin:
    """A third-party plugin contributing a callback through the hook."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def speculators_training_callbacks(self, args):
        self.calls += 1
        return [_Alarm(args)]


def test_plugin_callbacks_come_from_the_hook_once(fixture_plugin, small_verifier, tmp_path):
    """The hook is asked once per run, with the run's arguments, before the builtins' peers."""
    alarm_plugin = _AlarmPlugin()
    host = PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[
            ("speculators.algorithms:fixture-mlp", fixture_plugin),
            ("speculators.plugins:alarm", alarm_plugin),
        ],
    )
    args = TrainingArguments(output_dir=str(tmp_path / "run"), seq_len=32, num_epochs=2)
    samples = random_samples(10, hidden=32, vocab=256, seed=0)
    trainer = Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host)
    trainer.train()
    assert alarm_plugin.calls == 1
    names = [type(cb).__name__ for cb in trainer.handler.callbacks]
    assert "_Alarm" in names and "DefaultFlowCallback" in names and "CheckpointCallback" in names
    alarm = next(cb for cb in trainer.handler.callbacks if isinstance(cb, _Alarm))
    assert alarm.args is args


def test_builtins_are_contributed_through_the_hook(small_verifier, tmp_path, fixture_plugin):
    """Without the core's built-in plugin, no built-in behaviour runs (no logs, no checkpoints)."""
    host = PluginHost(
        PluginSettings(),
        entry_points=False,
        builtins=False,
        plugins=[("speculators.algorithms:fixture-mlp", fixture_plugin)],
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), seq_len=32, num_epochs=2, log_every=1
    )
    samples = random_samples(10, hidden=32, vocab=256, seed=0)
    trainer = Trainer(_draft(host, small_verifier), args, InMemorySource(samples), host=host)
    assert trainer.handler.callbacks == []
    result = trainer.train()
    assert result.state.log_history == [] and list_checkpoints(args.output_dir) == []
    assert (result.final_dir / "model.safetensors").is_file()


def test_handler_rejects_non_callbacks_and_bad_returns():
    """Plugins must return TrainerCallback instances, and events return a control or None."""
    with pytest.raises(PluginError, match="not a TrainerCallback"):
        CallbackHandler([object()])

    class Bad(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            return {"stop": True}

    handler = CallbackHandler([Bad()])
    with pytest.raises(PluginError, match="return a TrainerControl or None"):
        handler.call("on_log", TrainingArguments(), TrainerState(), TrainerControl())


def test_early_stopping_counts_and_restores():
    """Patience counts validations without improvement; its state survives a round trip."""
    cb = EarlyStoppingCallback("val_loss", patience=2, greater_is_better=False, threshold=0.1)
    args, state = TrainingArguments(), TrainerState()
    control = TrainerControl()
    for value, stop in [(1.0, False), (0.95, False), (0.5, False), (0.45, False), (0.44, True)]:
        control = cb.on_evaluate(args, state, control, metrics={"val_loss": value})
        assert control.should_training_stop is stop, value
    restored = EarlyStoppingCallback("val_loss", patience=2, greater_is_better=False)
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert restored.state_dict() == cb.state_dict() == {"best": 0.5, "bad_evaluations": 2}
    with pytest.raises(TrainingConfigError, match="val_acc"):
        cb.on_evaluate(args, state, control, metrics={"val_acc": 1.0})


def test_trainer_state_json_round_trip():
    """TrainerState survives JSON; the per-process flag is not stored."""
    state = TrainerState(
        global_step=7, epoch=1, step_in_epoch=2, best_metric=0.5, log_history=[{"step": 7}]
    )
    data = json.loads(json.dumps(state.to_json()))
    assert "is_world_process_zero" not in data
    assert TrainerState.from_json(data) == state


def test_builtin_plugin_contributes_the_core_callbacks(host):
    """The core's built-in plugin answers the hook with its callbacks, chosen by the arguments."""
    from speculators_core.train import (
        CheckpointCallback,
        DefaultFlowCallback,
        MetricsLoggerCallback,
        ProgressCallback,
    )

    plain = host.training_callbacks(TrainingArguments(progress=False, tensorboard=False))
    assert [type(cb) for cb in plain] == [
        DefaultFlowCallback,
        CheckpointCallback,
        MetricsLoggerCallback,
    ]
    full = host.training_callbacks(TrainingArguments(early_stopping_patience=3, tensorboard=False))
    assert [type(cb) for cb in full] == [
        DefaultFlowCallback,
        CheckpointCallback,
        EarlyStoppingCallback,
        MetricsLoggerCallback,
        ProgressCallback,
    ]
    quiet = host.training_callbacks(
        TrainingArguments(console_log=False, jsonl_log=False, progress=False, tensorboard=False)
    )
    assert [type(cb) for cb in quiet] == [DefaultFlowCallback, CheckpointCallback]
    assert host.training_callbacks(object()) == []  # not a core Trainer run: nothing added


def test_tensorboard_requested_but_missing_is_a_clear_error(host, monkeypatch):
    """tensorboard=true without the package: a one-line error naming the fix."""
    from speculators_core.train import builtin_callbacks as module

    monkeypatch.setattr(module, "tensorboard_available", lambda: False)
    with pytest.raises(TrainingConfigError, match="pip install tensorboard"):
        module.default_callbacks(TrainingArguments(tensorboard=True))
    assert not any(
        isinstance(cb, module.TensorBoardCallback)
        for cb in module.default_callbacks(TrainingArguments(tensorboard=None))
    )
