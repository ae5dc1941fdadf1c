"""``speculators quickstart``: from a verifier and chat data to a draft that vLLM serves.

Stages, each resumable and each writing its own folder under the output folder:

1. ``verifier``: resolve the verifier (``smollm2`` materialises the embedded SmolLM2 once);
2. ``data``: the first user turn of each training conversation, answered again by the verifier
   (greedy, vLLM when installed, else transformers): the draft learns the very distribution it
   will be asked to predict. ``--no-regenerate`` keeps the data's own answers;
3. ``hidden-states``: the states the algorithm trains on, captured into a shard store;
4. ``vocab``: token frequencies of the supervised tokens and the draft vocabulary (d2t, t2d);
5. ``train``: the algorithm trained by the core trainer for what is left of the budget (minus
   the evaluation reserve): a few calibration steps measure the step time, which fixes the step
   count and so the learning-rate schedule; checkpoints every few minutes make it resumable;
6. ``eval``: acceptance on held-out prompts with the reference decoder and with vLLM (greedy),
   and with the reference decoder at temperature 1 (what chat users sample at);
7. ``serve``: speed as users feel it, after the budget: ``vllm serve`` for the verifier alone,
   the draft at each k of ``server_k_values`` and vLLM's n-gram lookup, one at a time, driven
   over HTTP at concurrency 1 and a sweep; the fastest k at concurrency 1 is chosen and, when the
   draft pays, written into it (``serve/server.json``, ``speedup_vs_k.png``,
   ``speedup_vs_concurrency.png``);
8. ``report``: ``report.json``, ``acceptance.png``, ``training.png`` and the ``vllm serve`` line
   (at the chosen k).

``quickstart.json`` in the output folder records the settings and each finished stage, so a
rerun of the same command (``--resume`` says so explicitly) skips what is done and continues the
rest (the training stage continues from its newest checkpoint); ``--overwrite`` starts again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError
from speculators_core.fsutil import atomic_directory, atomic_file
from speculators_core.quickstart.settings import QuickstartSettings

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost

__all__ = ["STATE_NAME", "QuickstartResult", "run_quickstart"]

logger = logging.getLogger(__name__)

STATE_NAME = "quickstart.json"
#: Training checkpoints are written about this often (seconds of training), for resume.
CHECKPOINT_SECONDS = 180.0
#: Validations during training (they draw the training curve of acceptance).
VALIDATIONS = 10
#: Training steps timed to fix the step count (after one warm-up step).
CALIBRATION_STEPS = 3
#: Planned step time = median calibrated step time x this (validation, saving, row variety).
STEP_TIME_MARGIN = 1.3
#: Conversations decoded together by the one-pass data route (also its shard size).
ONE_PASS_BATCH = 64
#: Fewest training steps the quickstart will run, however small the budget.
MIN_TRAIN_STEPS = 10
#: The sampling temperature of the eval stage's second reference measurement.
SAMPLED_TEMPERATURE = 1.0

Echo = Callable[[str], None]


@dataclass
class QuickstartResult:
    """Where the quickstart wrote its results."""

    output: Path
    speculator: Path
    report: dict[str, Any]
    serve_command: str


@dataclass
class _State:
    """``quickstart.json``: the settings and the finished stages with their facts."""

    path: Path
    settings: dict[str, Any]
    started: float = field(default_factory=time.time)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def finish(self, stage: str, **facts: Any) -> None:
        self.stages[stage] = facts
        self.save()

    def save(self) -> None:
        data = {"settings": self.settings, "started": self.started, "stages": self.stages}
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def spent_seconds(self) -> float:
        """Seconds the finished stages took (a resumed run's budget counts them)."""
        return sum(float(s.get("seconds", 0.0)) for s in self.stages.values())


def _open_state(
    output: Path, settings: QuickstartSettings, *, resume: bool, overwrite: bool
) -> _State:
    state_file = output / STATE_NAME
    if output.exists() and not output.is_dir():
        raise SpeculatorsError(f"output '{output}' is a file; pass a folder path")
    if overwrite and resume:
        raise SpeculatorsError("--overwrite and --resume contradict each other; pass one of them")
    if output.is_dir() and any(output.iterdir()):
        if overwrite:
            shutil.rmtree(output)
        elif not state_file.is_file():
            raise SpeculatorsError(
                f"output folder '{output}' already exists and is not a quickstart run (no "
                f"{STATE_NAME}); choose another --output or pass --overwrite"
            )
        # A quickstart run with the same settings continues (checked below), --resume or not:
        # rerunning the command is how an interrupted run is finished.
    output.mkdir(parents=True, exist_ok=True)
    if state_file.is_file():
        recorded = json.loads(state_file.read_text())
        changed = settings.changed_fixed_fields(recorded.get("settings", {}))
        if changed:
            name = changed[0]
            raise SpeculatorsError(
                f"'{output}' was started with {name}={recorded['settings'].get(name)!r}, not "
                f"{getattr(settings, name)!r}; continue it with the same settings, or pass "
                "--overwrite to start again"
            )
        state = _State(
            state_file,
            settings.to_json(),
            started=recorded.get("started", time.time()),
            stages=recorded.get("stages", {}),
        )
    else:
        state = _State(state_file, settings.to_json())
    state.save()
    return state


# ------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------


def _data_stage(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    out: Path,
    echo: Echo,
    host: PluginHost,
) -> Path:
    prepared = out / "data" / "prepared"
    if state.done("data"):
        return prepared
    started = time.perf_counter()
    backend = settings.generation_backend
    if backend == "auto":
        backend = "one-pass"
    if settings.regenerate and backend == "one-pass":
        _one_pass_data(state, settings, verifier, out, echo, host)
        return prepared
    if settings.regenerate:
        from speculators_core.data.regenerate import GenerationSettings, regenerate_data

        echo(
            f"[data] {settings.samples} conversations: first user turn, answered again by the "
            f"verifier (greedy, {settings.max_new_tokens} new tokens at most, {backend})"
        )
        summary = regenerate_data(
            verifier=verifier,
            sources=settings.data,
            output=prepared,
            settings=GenerationSettings(max_new_tokens=settings.max_new_tokens, seed=settings.seed),
            seq_length=settings.seq_length,
            max_samples=settings.samples,
            seed=settings.seed,
            batch_size=16,
            chunk_size=64,
            backend=backend,
            overwrite=True,
            progress=True,
            max_turns=1,
        )
    else:
        from speculators_core.data.prepared import prepare_data

        echo(f"[data] {settings.samples} conversations rendered with the chat template")
        summary = prepare_data(
            verifier=verifier,
            sources=settings.data,
            output=prepared,
            seq_length=settings.seq_length,
            max_samples=settings.samples,
            seed=settings.seed,
            overwrite=True,
        )
    echo(f"[data] {summary.describe()}")
    state.finish(
        "data",
        seconds=time.perf_counter() - started,
        samples=summary.num_samples,
        tokens=summary.num_tokens,
        supervised_tokens=summary.num_supervised_tokens,
        regenerated=settings.regenerate,
    )
    return prepared


def _one_pass_data(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    out: Path,
    echo: Echo,
    host: PluginHost,
) -> None:
    """Regenerate the answers and capture their states in one verifier pass (both stages)."""
    from speculators_core.data.decode_capture import regenerate_to_store
    from speculators_core.data.specs import spec_for_algorithm

    started = time.perf_counter()
    spec = spec_for_algorithm(settings.algorithm, verifier, host=host)
    echo(
        f"[data] {settings.samples} conversations: first user turn, answered again by the "
        f"verifier (greedy, {settings.max_new_tokens} new tokens at most), its hidden states "
        f"(layers {list(spec.layer_ids)}) recorded while it decodes"
    )
    data_summary, store_summary = regenerate_to_store(
        verifier=verifier,
        sources=settings.data,
        prepared_output=out / "data" / "prepared",
        store_output=out / "data" / "store",
        spec=spec,
        max_new_tokens=settings.max_new_tokens,
        seq_length=settings.seq_length,
        max_samples=settings.samples,
        seed=settings.seed,
        batch_size=ONE_PASS_BATCH,
        overwrite=True,
        progress=True,
    )
    echo(f"[data] {data_summary.describe()}")
    seconds = time.perf_counter() - started
    state.finish(
        "data",
        seconds=seconds,
        samples=data_summary.num_samples,
        tokens=data_summary.num_tokens,
        supervised_tokens=data_summary.num_supervised_tokens,
        regenerated=True,
        backend="one-pass",
    )
    state.finish(
        "hidden-states",
        seconds=0.0,  # counted in the data stage: one pass made both
        tokens=store_summary.num_tokens,
        tokens_per_second=store_summary.num_tokens / seconds if seconds > 0 else 0.0,
        bytes=store_summary.bytes_written,
        one_pass=True,
    )


def _hidden_state_stage(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    prepared: Path,
    out: Path,
    echo: Echo,
    host: PluginHost,
) -> Path:
    store = out / "data" / "store"
    if state.done("hidden-states"):
        return store
    import torch

    from speculators_core.data.specs import spec_for_algorithm
    from speculators_core.data.store import capture_to_store

    started = time.perf_counter()
    spec = spec_for_algorithm(settings.algorithm, verifier, host=host)
    if store.is_dir():  # captured completely before an interruption: keep it
        from speculators_core.data.store import ShardStore

        ShardStore.open(store).check_verifier(verifier)
        state.finish("hidden-states", seconds=0.0, reused=True)
        return store
    echo(f"[hidden-states] verifier layers {list(spec.layer_ids)} captured into a bf16 store")
    summary = capture_to_store(
        verifier=verifier,
        prepared=prepared,
        output=store,
        spec=spec,
        batch_size=8,
        max_batch_tokens=4096,
        compute_dtype=torch.float32,  # bf16 matmuls are slower than fp32 on most CPUs
        progress=True,
    )
    echo(f"[hidden-states] {summary.describe()}")
    state.finish(
        "hidden-states",
        seconds=time.perf_counter() - started,
        tokens=summary.num_tokens,
        tokens_per_second=summary.tokens_per_second,
        bytes=summary.bytes_written,
    )
    return store


def _vocab_stage(
    state: _State, settings: QuickstartSettings, store: Path, out: Path, echo: Echo
) -> Path:
    vocab = out / "data" / "vocab"
    if state.done("vocab"):
        return vocab
    from speculators_core.data.token_freq import build_draft_vocab

    started = time.perf_counter()
    with atomic_directory(vocab, overwrite=True) as tmp:
        summary = build_draft_vocab(
            data=store, output=tmp, draft_vocab_size=settings.draft_vocab_size
        )
    echo(f"[vocab] {'; '.join(summary.notes)}")
    state.finish("vocab", seconds=time.perf_counter() - started, notes=summary.notes)
    return vocab


def _run_config(
    settings: QuickstartSettings,
    verifier: Path,
    store: Path,
    vocab: Path,
    run_dir: Path,
    *,
    max_steps: int,
    steps_per_epoch: int,
    checkpoint_every: int,
    validate_every: int,
    resume: bool,
) -> Any:
    from speculators_core.train.arguments import TrainingArguments
    from speculators_core.train.launch import RunConfig

    training = TrainingArguments(
        output_dir=str(run_dir),
        # One epoch more than the plan needs: max_steps ends the run. The calibration counts
        # steps per epoch without the validation split, so real epochs are a little shorter.
        num_epochs=max(1, math.ceil(max_steps / max(steps_per_epoch, 1))) + 1,
        max_steps=max_steps,
        seq_len=settings.train_seq_len,
        learning_rate=settings.learning_rate,
        optimizer=settings.optimizer,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        min_lr_ratio=0.05,
        seed=settings.seed,
        log_every=5,
        eval_every=validate_every,
        eval_per_epoch=False,
        save_every=checkpoint_every,
        save_per_epoch=False,
        save_total_limit=1,
        metric_for_best=None,
        console_log=False,
        tensorboard=False,
        val_fraction=0.05,
    )
    return RunConfig(
        algorithm=settings.algorithm,
        verifier=str(verifier),
        data=str(store),
        output=str(run_dir),
        vocab=str(vocab),
        algo_options=dict(settings.algo_options),
        training=training,
        resume=resume,
        overwrite=not resume,
    )


def _calibrate(
    settings: QuickstartSettings,
    verifier: Path,
    store: Path,
    vocab: Path,
    out: Path,
    host: PluginHost,
) -> tuple[float, int]:
    """Seconds per training step (best of a few timed steps) and steps per epoch."""
    from speculators_core.train.callbacks import TrainerCallback
    from speculators_core.train.launch import prepare_run

    times: list[float] = []

    class _Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.began = time.perf_counter()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            times.append(time.perf_counter() - self.began)
            return control

    probe_dir = out / "train" / ".calibration"
    shutil.rmtree(probe_dir, ignore_errors=True)
    config = _run_config(
        settings,
        verifier,
        store,
        vocab,
        probe_dir,
        max_steps=CALIBRATION_STEPS + 1,
        steps_per_epoch=1,
        checkpoint_every=10**9,
        validate_every=10**9,
        resume=False,
    )
    config.training = config.training.replace(
        progress=False, jsonl_log=False, val_fraction=0.0, save_total_limit=None
    )
    try:
        prepared = prepare_run(config, host=host, callbacks=(_Timer(),))
        steps_per_epoch = prepared.trainer.plan.steps_in_epoch(0)
        prepared.trainer.train()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    timed = sorted(times[1:] or times)
    # The median, plus a margin for what the timed steps do not contain (validations,
    # checkpoint writes, rows of other lengths): measured, a run took 1.36x its best step time.
    return timed[len(timed) // 2] * STEP_TIME_MARGIN, steps_per_epoch


def _train_stage(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    store: Path,
    vocab: Path,
    out: Path,
    echo: Echo,
    host: PluginHost,
    *,
    resume: bool,
) -> Path:
    run_dir = out / "train"
    final = run_dir / "final"
    if state.done("train"):
        return final
    from speculators_core.train.launch import prepare_run, run_training

    started = time.perf_counter()
    plan = state.stages.get("train-plan")
    if plan is None:
        budget_s = settings.budget_minutes * 60.0
        left_s = budget_s - state.spent_seconds() - settings.eval_reserve_minutes * 60.0
        step_s, steps_per_epoch = _calibrate(settings, verifier, store, vocab, out, host)
        calibration_s = time.perf_counter() - started
        left_s -= calibration_s
        max_steps = max(MIN_TRAIN_STEPS, int(left_s / step_s))
        plan = {
            "seconds": calibration_s,
            "seconds_per_step": step_s,
            "steps_per_epoch": steps_per_epoch,
            "max_steps": max_steps,
            "training_seconds_planned": max_steps * step_s,
        }
        if left_s < MIN_TRAIN_STEPS * step_s:
            echo(
                f"[train] warning: the budget leaves {max(left_s, 0):.0f} s for training; "
                f"running the minimum of {MIN_TRAIN_STEPS} steps (raise --budget-minutes)"
            )
        state.finish("train-plan", **plan)
        resume = False
    else:
        resume = run_dir.is_dir()  # the plan exists: this run was started before
    max_steps = int(plan["max_steps"])
    step_s = float(plan["seconds_per_step"])
    epochs = max_steps / max(int(plan["steps_per_epoch"]), 1)
    echo(
        f"[train] {settings.algorithm}: {max_steps} steps of {settings.train_seq_len}-token rows "
        f"(~{max_steps * step_s / 60:.1f} min at {step_s:.2f} s/step, {epochs:.1f} epochs), "
        f"lr {settings.learning_rate:g} cosine; options "
        + (", ".join(f"{k}={v}" for k, v in sorted(settings.algo_options.items())) or "none")
    )
    config = _run_config(
        settings,
        verifier,
        store,
        vocab,
        run_dir,
        max_steps=max_steps,
        steps_per_epoch=int(plan["steps_per_epoch"]),
        checkpoint_every=max(1, int(CHECKPOINT_SECONDS / step_s)),
        validate_every=max(1, max_steps // VALIDATIONS),
        resume=resume,
    )
    result = run_training(prepare_run(config, host=host))
    metrics = {k: float(v) for k, v in result.metrics.items()}
    state.finish(
        "train",
        seconds=time.perf_counter() - started,
        steps=result.state.global_step,
        tokens_seen=result.state.tokens_seen,
        final_metrics=metrics,
    )
    return Path(result.final_dir)


def _eval_prompts(settings: QuickstartSettings, verifier: Path) -> tuple[list[list[int]], set[int]]:
    from transformers import AutoTokenizer

    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts

    tokenizer = AutoTokenizer.from_pretrained(verifier)
    texts = load_prompt_texts(settings.eval_prompt_source, settings.eval_prompts)
    prompts = render_prompts(texts, tokenizer, max_prompt_tokens=settings.seq_length)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    return prompts, eos


def _served_from_folder(settings: QuickstartSettings, host: PluginHost) -> bool:
    """Whether vLLM serves the algorithm's folder itself (no export step)."""
    serving = host.algorithm(settings.algorithm).vllm
    return serving is not None and not serving.export


def _eval_stage(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    speculator: Path,
    echo: Echo,
    host: PluginHost,
) -> list[dict[str, Any]]:
    if state.done("eval"):
        return list(state.stages["eval"]["results"])
    from speculators_core.evaluate.evaluation import evaluate_reference, evaluate_vllm
    from speculators_core.evaluate.vllm_runner import vllm_available

    started = time.perf_counter()
    prompts, eos = _eval_prompts(settings, verifier)
    common = dict(
        k=settings.k, temperature=0.0, max_new_tokens=settings.eval_max_new_tokens, seed=0
    )
    results: list[dict[str, Any]] = []
    if settings.vllm_eval and not _served_from_folder(settings, host):
        echo(f"[eval] vLLM cannot serve algorithm '{settings.algorithm}': skipping vLLM")
    elif settings.vllm_eval and vllm_available():
        echo(f"[eval] vLLM: {len(prompts)} held-out prompts, k={settings.k}, greedy")
        results.append(
            # Acceptance only: speed is measured as users feel it, through vllm serve (the
            # serve stage); the offline engine's batched throughput is not that figure.
            evaluate_vllm(speculator, verifier, prompts, baseline=False, host=host, **common)  # type: ignore[arg-type]
        )
    elif settings.vllm_eval:
        echo("[eval] vLLM is not installed: skipping the vLLM measurement")
    if settings.reference_eval:
        subset = prompts[: settings.reference_prompts]
        echo(
            f"[eval] reference decoder: the first {len(subset)} of those prompts, k={settings.k}, "
            "greedy"
        )
        results.append(
            evaluate_reference(speculator, verifier, subset, eos=eos, baseline=False, **common)  # type: ignore[arg-type]
        )
        # Chat users sample: the same prompts at temperature 1 (the default proposal method,
        # vLLM's: argmax drafts, standard rejection sampling), seeded.
        echo(f"[eval] reference decoder: the same {len(subset)} prompts at temperature 1")
        sampled = evaluate_reference(
            speculator,
            verifier,
            subset,
            eos=eos,
            baseline=False,
            **{**common, "temperature": SAMPLED_TEMPERATURE},  # type: ignore[arg-type]
        )
        results.append({**sampled, "temperature": SAMPLED_TEMPERATURE})
    for r in results:
        r.setdefault("temperature", 0.0)
        echo(
            f"[eval] {r['engine']} (T={r['temperature']:g}): mean acceptance length "
            f"{r['mean_acceptance_length']:.3f}, "
            f"per position {', '.join(f'{x:.2f}' for x in r['acceptance_rate_per_position'])}"
            + (f", speed-up {r['speedup']:.2f}x" if "speedup" in r else "")
        )
    state.finish(
        "eval", seconds=time.perf_counter() - started, results=results, num_prompts=len(prompts)
    )
    return results


def _serve_stage(
    state: _State,
    settings: QuickstartSettings,
    verifier: Path,
    speculator: Path,
    out: Path,
    echo: Echo,
    host: PluginHost,
) -> dict[str, Any] | None:
    """Speed as users feel it: ``vllm serve`` for the verifier, the draft at each k, n-gram.

    Writes ``serve/server.json`` and the two speed-up PNGs, and the fastest k into the draft
    when it pays. Returns the measurement (None when skipped).
    """
    if state.done("serve"):
        recorded = state.stages["serve"]
        return dict(recorded["report"]) if recorded.get("report") else None
    from speculators_core.evaluate.vllm_runner import vllm_available

    skip = None
    if not settings.server_eval:
        skip = "switched off (--no-server-eval)"
    elif not _served_from_folder(settings, host):
        skip = f"vLLM cannot serve algorithm '{settings.algorithm}' from its folder"
    elif not vllm_available():
        skip = "vLLM is not installed"
    if skip is not None:
        if settings.server_eval:
            echo(f"[serve] {skip}: skipping the speed measurement")
        state.finish("serve", seconds=0.0, skipped=skip, report=None)
        return None

    from speculators_core.evaluate.vllm_server import compare_served, save_served, write_chosen_k

    started = time.perf_counter()
    prompts, _ = _eval_prompts(settings, verifier)
    prompts = prompts[: settings.server_prompts]
    folder = out / "serve"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    servers = len(settings.server_k_values) + 2
    echo(
        f"[serve] speed through vllm serve: {servers} servers one at a time (verifier alone, "
        f"draft at k={','.join(map(str, settings.server_k_values))}, n-gram lookup), "
        f"{len(prompts)} prompts, concurrency {','.join(map(str, settings.server_concurrency))}"
    )
    report = compare_served(
        speculator,
        prompts,
        plugin_host=host,
        k_values=settings.server_k_values,
        concurrencies=settings.server_concurrency,
        max_new_tokens=settings.eval_max_new_tokens,
        verifier=str(verifier),
        log_dir=folder / "logs",
        echo=lambda line: echo(f"[serve] {line}"),
    )
    save_served(report, folder / "server.json", out)
    from speculators_core.evaluate.tables import served_table

    for line in served_table(report):
        echo(f"[serve] {line}")
    echo(f"[serve] {write_chosen_k(speculator, report, plugin_host=host)}")
    state.finish("serve", seconds=time.perf_counter() - started, report=report)
    return report


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


def run_quickstart(
    settings: QuickstartSettings,
    output: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    echo: Echo = print,
    host: PluginHost | None = None,
) -> QuickstartResult:
    """Run (or continue) the whole pipeline into ``output``; see the module docs.

    ``host`` provides the algorithm (the default plugin host if None).
    """
    from speculators_core.assets import resolve_verifier_path
    from speculators_core.plugins.host import get_host
    from speculators_core.quickstart.report import write_report

    # vLLM's per-request INFO lines would bury the progress of the stages.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    out = Path(output).absolute()
    host = host if host is not None else get_host()
    # An unknown algorithm fails here, listing the installed ones; so do unknown or mistyped
    # algorithm options, before anything is written.
    settings = settings.with_algorithm(host.algorithm(settings.algorithm))
    try:
        verifier = resolve_verifier_path(settings.verifier)
    except FileNotFoundError as err:
        raise SpeculatorsError(str(err)) from err
    if not (verifier / "config.json").is_file():
        raise SpeculatorsError(
            f"verifier '{settings.verifier}' is not a model folder (no config.json); pass a local "
            "transformers model folder or 'smollm2'"
        )
    state = _open_state(out, settings, resume=resume, overwrite=overwrite)
    if state.stages:
        done = ", ".join(name for name in state.stages if name != "train-plan")
        echo(f"continuing the run in {out} (done: {done or 'nothing yet'})")
    echo(
        f"quickstart: {settings.algorithm} draft for {verifier.name}, budget "
        f"{settings.budget_minutes:g} min, output {out}"
    )
    prepared = _data_stage(state, settings, verifier, out, echo, host)
    store = _hidden_state_stage(state, settings, verifier, prepared, out, echo, host)
    vocab = _vocab_stage(state, settings, store, out, echo)
    final = _train_stage(state, settings, verifier, store, vocab, out, echo, host, resume=resume)

    speculator = out / "speculator"
    if not speculator.is_dir():
        with atomic_directory(speculator, overwrite=True) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
    results = _eval_stage(state, settings, verifier, speculator, echo, host)
    served = _serve_stage(state, settings, verifier, speculator, out, echo, host)
    report = write_report(
        out,
        state.stages,
        settings,
        speculator,
        results,
        run_dir=out / "train",
        host=host,
        served=served,
    )
    state.finish("report", seconds=0.0, total_seconds=report["total_seconds"])
    command = str(report["serve_command"])  # built once, by the report
    return QuickstartResult(out, speculator, report, command)
