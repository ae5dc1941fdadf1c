"""From a resolved run configuration to a trained draft: what ``speculators train`` does.

:func:`resolve_run_config` merges defaults, a YAML/JSON config file and command-line values into
a :class:`RunConfig`. :func:`prepare_run` checks everything that can be wrong *before* any
training starts (unknown algorithm, output folder, missing or foreign data, hidden-state spec)
and builds the draft and the data sources; :func:`describe_run` is what ``--dry-run`` prints;
:func:`run_training` trains and writes ``<output>/final``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from speculators_core.errors import SpeculatorsError
from speculators_core.fsutil import atomic_file
from speculators_core.objectives import resolve_objective_options
from speculators_core.options import resolve_training_options
from speculators_core.train.arguments import TrainingArguments
from speculators_core.train.distributed import DistributedContext
from speculators_core.train.errors import DataError, ResumeError, TrainingConfigError
from speculators_core.train.packing import SampleSource
from speculators_core.train.trainer import Trainer, TrainOutput, parameter_counts

if TYPE_CHECKING:
    from speculators_core.model import SpeculatorModel
    from speculators_core.plugins.host import PluginHost

__all__ = [
    "RUN_CONFIG_NAME",
    "PreparedRun",
    "RunConfig",
    "describe_run",
    "load_config_file",
    "prepare_run",
    "resolve_run_config",
    "run_training",
]

logger = logging.getLogger(__name__)

#: The resolved run configuration, written to the output folder when training starts.
RUN_CONFIG_NAME = "run_config.json"
#: Run fields that must not change when a run is resumed.
_RESUME_FIXED = ("algorithm", "verifier", "data", "val_data", "online")


@dataclass
class RunConfig:
    """Everything ``speculators train`` needs, resolved from flags and a config file."""

    algorithm: str
    verifier: str
    data: str
    output: str
    #: A separate validation store (or prepared data with ``online``); default: a split of ``data``.
    val_data: str | None = None
    #: ``data`` is prepared data (token ids + loss masks) and the verifier computes hidden
    #: states during training (no store on disk).
    online: bool = False
    #: A folder from ``speculators data vocab`` (d2t.npy/t2d.npy or token_freq.json), or a
    #: token-frequency file, for the draft vocabulary.
    vocab: str | None = None
    num_layers: int | None = None
    draft_vocab_size: int | None = None
    #: The algorithm's own ``from_verifier`` options (checked against, and converted to, the
    #: types the algorithm declares in ``Algorithm.training_options`` by :func:`prepare_run`).
    algo_options: dict[str, Any] = field(default_factory=dict)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    overwrite: bool = False
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the training arguments nested under ``training``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["training"] = self.training.to_dict()
        data["algo_options"] = {k: _summarise(v) for k, v in self.algo_options.items()}
        return data


#: Top-level keys of a config file besides the training arguments.
RUN_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RunConfig) if f.name not in {"training"}
)


def _summarise(value: Any) -> Any:
    """A JSON-ready stand-in for option values that are tensors or big mappings."""
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    if isinstance(value, dict) and len(value) > 32:
        return f"<mapping of {len(value)} entries>"
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict; one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise TrainingConfigError(f"config file '{file}' does not exist")
    text = file.read_text()
    try:
        if file.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: both mean "unreadable"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingConfigError(
            f"config file '{file}' is not valid {file.suffix.lstrip('.').upper() or 'JSON'}: {first}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingConfigError(
            f"config file '{file}' holds a {type(data).__name__}; it must be a mapping of option names to values"
        )
    return data


def resolve_run_config(
    file_values: dict[str, Any], cli_values: dict[str, Any], cli_algo_options: dict[str, Any]
) -> RunConfig:
    """Merge a config file's values with command-line values (which win when given).

    In ``cli_values`` ``None`` means "not given"; in ``file_values`` a ``null`` sets the value
    to ``None`` (``save_total_limit: null`` keeps every checkpoint).

    Keys may use dashes or underscores; a ``training`` mapping in the file is flattened. Missing
    required values and unknown keys are one-line errors.
    """
    merged: dict[str, Any] = {}
    for source, given_only in ((file_values, False), (cli_values, True)):
        flat = dict(source)
        nested = flat.pop("training", None)
        if nested is not None:
            if not isinstance(nested, dict):
                raise TrainingConfigError(
                    "config entry 'training' must be a mapping of training arguments"
                )
            flat = {**nested, **flat}
        for key, value in flat.items():
            # A command-line None means "not given"; a config file's null unsets the value.
            if value is not None or not given_only:
                merged[key.replace("-", "_")] = value
    if "output_dir" in merged:
        merged.setdefault("output", merged.pop("output_dir"))
    algo_options = dict(merged.pop("algo_options", {}) or {})
    if not isinstance(algo_options, dict):
        raise TrainingConfigError(
            "config entry 'algo_options' must be a mapping of option names to values"
        )
    algo_options.update(cli_algo_options)
    training_names = {f.name for f in dataclasses.fields(TrainingArguments)} - {"output_dir"}
    run_values = {k: v for k, v in merged.items() if k in RUN_KEYS}
    training_values = {k: v for k, v in merged.items() if k in training_names}
    unknown = sorted(set(merged) - set(run_values) - set(training_values))
    if unknown:
        valid = sorted({*RUN_KEYS, *training_names})
        raise TrainingConfigError(f"unknown option '{unknown[0]}'; valid ones: {', '.join(valid)}")
    for required, flag in (
        ("algorithm", "--algorithm"),
        ("verifier", "--verifier"),
        ("data", "--data"),
        ("output", "--output"),
    ):
        if not run_values.get(required):
            raise TrainingConfigError(f"missing {flag} (or '{required}' in the config file)")
    training = TrainingArguments.from_dict(
        {**training_values, "output_dir": os.path.abspath(str(run_values["output"]))}
    )
    if run_values.get("verifier") is not None:
        from speculators_core.assets import resolve_verifier_path

        run_values["verifier"] = str(resolve_verifier_path(run_values["verifier"]))
    for key in ("verifier", "data", "output", "val_data", "vocab"):
        if run_values.get(key) is not None:
            # Absolute paths: the resolved config is recorded and compared on resume.
            run_values[key] = os.path.abspath(str(run_values[key]))
    return RunConfig(**run_values, algo_options=algo_options, training=training)


# ------------------------------------------------------------------------------------------
# checks and set-up
# ------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """A checked run: the draft, its data, and the trainer that will train it."""

    config: RunConfig
    host: PluginHost
    model: SpeculatorModel
    trainer: Trainer
    #: The options ``from_verifier`` received (tensors included).
    algo_options: dict[str, Any]


def _check_output(config: RunConfig) -> None:
    out = Path(config.output)
    if config.overwrite and config.resume:
        raise TrainingConfigError(
            "--overwrite and --resume contradict each other; pass one of them"
        )
    if out.exists() and not out.is_dir():
        raise TrainingConfigError(f"output '{out}' is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (config.overwrite or config.resume):
        raise TrainingConfigError(
            f"output folder '{out}' already exists; pass --overwrite to replace it or --resume to continue its run"
        )
    saved = out / RUN_CONFIG_NAME
    if config.resume and saved.is_file():
        before = json.loads(saved.read_text())
        now = config.to_json()
        changed = [k for k in _RESUME_FIXED if before.get(k) != now.get(k)]
        if changed:
            key = changed[0]
            raise ResumeError(
                f"output '{out}' was trained with {key}={before.get(key)!r}, not {now.get(key)!r}; "
                "resume with the same settings or choose a new --output"
            )


def _open_data(path: str, config: RunConfig) -> Any:
    """Open a hidden-state store (or prepared data when online) and check its verifier."""
    if config.online:
        from speculators_core.data.errors import VerifierMismatchError
        from speculators_core.data.fingerprint import short_fingerprint, tokenizer_fingerprint
        from speculators_core.data.prepared import PreparedDataset

        prepared = PreparedDataset.open(path)
        actual = tokenizer_fingerprint(config.verifier)
        if prepared.manifest.tokenizer_fingerprint != actual:
            raise VerifierMismatchError(
                f"prepared data '{path}' was tokenized for verifier '{prepared.manifest.verifier_path}' "
                f"(tokenizer {short_fingerprint(prepared.manifest.tokenizer_fingerprint)}), not "
                f"'{config.verifier}' (tokenizer {short_fingerprint(actual)}); prepare it again with this verifier"
            )
        return prepared
    from speculators_core.data.store import ShardStore

    store = ShardStore.open(path)
    store.check_verifier(config.verifier)
    return store


def _vocab_options(config: RunConfig) -> dict[str, Any]:
    """``from_verifier`` options for the draft vocabulary (explicit options win)."""
    options: dict[str, Any] = {}
    explicit = config.algo_options
    if config.vocab is not None:
        from speculators_core.data.token_freq import (
            D2T_NAME,
            T2D_NAME,
            load_token_counts,
            load_vocab_mapping,
        )

        vocab = Path(config.vocab)
        if vocab.is_dir() and (vocab / D2T_NAME).is_file() and (vocab / T2D_NAME).is_file():
            options["d2t"], options["t2d"] = load_vocab_mapping(vocab)
        else:
            options["token_counts"] = load_token_counts(vocab)
    elif config.draft_vocab_size is not None and not {"token_counts", "d2t"} & set(explicit):
        from speculators_core.data.token_freq import count_token_frequencies, token_arrays

        # No vocabulary given: the most frequent supervised tokens of the training data.
        found = token_arrays(config.data)  # (pairs, vocab size, ...)
        options["token_counts"] = count_token_frequencies(found[0], found[1])
    return options


def _check_spec(model: SpeculatorModel, data: Any, path: str, algorithm: str) -> None:
    manifest = getattr(data, "manifest", None)
    spec = getattr(manifest, "spec", None)
    if spec is None:
        return
    wanted = model.hidden_state_spec()
    if (
        tuple(spec.layer_ids) != tuple(wanted.layer_ids)
        or spec.post_norm_last != wanted.post_norm_last
    ):
        raise DataError(
            f"store '{path}' holds hidden states of layers {list(spec.layer_ids)} "
            f"(post_norm_last={spec.post_norm_last}) but this {algorithm} draft trains on "
            f"{list(wanted.layer_ids)} (post_norm_last={wanted.post_norm_last}); capture the data "
            f"with --algorithm {algorithm} or set the draft's layer options to match"
        )


def prepare_run(
    config: RunConfig,
    *,
    host: PluginHost | None = None,
    ctx: DistributedContext | None = None,
    callbacks: tuple[Any, ...] = (),
) -> PreparedRun:
    """Check the run and build the draft, the data sources and the trainer (no training yet).

    Raises a one-line :class:`~speculators_core.errors.SpeculatorsError` for an unknown
    algorithm, an algorithm option it does not declare or of the wrong type, an output folder
    that exists (without ``overwrite``/``resume``), a missing or corrupt store, a store made
    from another verifier, or hidden states the draft cannot use.
    """
    if host is None:
        from speculators_core.plugins.host import get_host

        host = get_host()
    algorithm = host.algorithm(config.algorithm)  # lists the installed ones when unknown
    # Unknown names and values of the wrong type fail here, before anything is read or written.
    config = dataclasses.replace(
        config, algo_options=resolve_training_options(algorithm, config.algo_options)
    )
    _check_output(config)
    if not Path(config.verifier).is_dir():
        raise SpeculatorsError(
            f"verifier '{config.verifier}' does not exist; pass a local model folder"
        )
    train_data = _open_data(config.data, config)
    val_data = _open_data(config.val_data, config) if config.val_data is not None else None

    options: dict[str, Any] = {}
    if config.num_layers is not None:
        options["num_layers"] = config.num_layers
    if config.draft_vocab_size is not None:
        options["draft_vocab_size"] = config.draft_vocab_size
    options.update(_vocab_options(config))
    options.update(config.algo_options)
    # Objective names are looked up in this run's host: a plugin's objective works as the core's.
    built_with = resolve_objective_options(algorithm, options, host)
    torch.manual_seed(config.training.seed)  # a reproducible initialisation of the draft
    try:
        model = algorithm.model_class.from_verifier(config.verifier, **built_with)
    except TypeError as err:
        raise TrainingConfigError(
            f"algorithm '{config.algorithm}' rejected its options ({err}); check --algo-opt names"
        ) from err

    if config.online:
        from speculators_core.train.sources import OnlineSource

        spec = model.hidden_state_spec()
        device = ctx.device if ctx is not None else None
        train_source: SampleSource = OnlineSource.from_verifier(
            train_data, config.verifier, spec, device=device
        )
        val_source = (
            OnlineSource.from_verifier(val_data, config.verifier, spec, device=device)
            if val_data is not None
            else None
        )
    else:
        _check_spec(model, train_data, config.data, config.algorithm)
        if val_data is not None:
            _check_spec(model, val_data, str(config.val_data), config.algorithm)
        train_source, val_source = train_data, val_data
    trainer = Trainer(
        model,
        config.training,
        train_source,
        val_data=val_source,
        host=host,
        ctx=ctx,
        callbacks=callbacks,
    )
    return PreparedRun(config=config, host=host, model=model, trainer=trainer, algo_options=options)


def describe_run(prepared: PreparedRun) -> dict[str, Any]:
    """The resolved configuration, parameter counts and data plan (what ``--dry-run`` prints)."""
    total, trainable = parameter_counts(prepared.model)
    data = prepared.config.to_json()
    data["algo_options"] = {k: _summarise(v) for k, v in prepared.algo_options.items()}
    data.pop("overwrite")
    data.pop("resume")
    data["parameters"] = {"total": total, "trainable": trainable}
    data["plan"] = prepared.trainer.describe()
    return data


def run_training(prepared: PreparedRun) -> TrainOutput:
    """Train a prepared run: replace or resume the output folder, train, write ``final``."""
    config, trainer = prepared.config, prepared.trainer
    ctx = trainer.ctx
    out = Path(config.output)
    if ctx.is_main:
        if config.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        record = describe_run(prepared)
        with atomic_file(out / RUN_CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    ctx.barrier()
    return trainer.train(resume_from="latest" if config.resume else None)
