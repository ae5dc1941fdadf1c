"""``speculators train``: train a draft on a hidden-state store (or online) with any algorithm.

Every training argument of :class:`~speculators_core.train.TrainingArguments` is an option
(its help is the field's documentation). Values come from, in increasing priority: the defaults,
a YAML/JSON ``--config`` file (same names, dashes or underscores; algorithm options under
``algo_options``), and the flags given on the command line. All checks (unknown algorithm,
existing output folder, missing store, store of another verifier) run before training starts.

Launch with ``torchrun --nproc_per_node N -m speculators_core train ...`` (or the
``speculators`` script path) to train on several processes with FSDP2.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import click

from speculators_core.cli.plugin_host import command_host
from speculators_core.errors import SpeculatorsError
from speculators_core.options import OptionText, describe_training_options, parse_key_values
from speculators_core.train.arguments import TrainingArguments
from speculators_core.train.errors import TrainingConfigError

__all__ = ["parse_algo_options", "train_command"]

_HELP = """Train a draft model for --verifier on --data with any installed --algorithm.

\b
Example:
  speculators train --algorithm eagle3 --verifier smollm2 --data store --output run \\
      --num-epochs 3 --seq-len 2048 --learning-rate 1e-4 --algo-opt ttt_steps=3

Values come from the defaults, then a YAML/JSON --config file (same option names, dashes or
underscores; algorithm options under 'algo_options'), then the flags given here. Everything is
checked before training starts. The trained draft is written to OUTPUT/final in speculators
format, ready for 'vllm serve'. Under 'torchrun --nproc_per_node N' the run uses N processes
with FSDP2.
"""

# Run options handled by this command itself, not generated from TrainingArguments.
_SKIPPED_FIELDS = {"output_dir"}


def parse_algo_options(pairs: tuple[str, ...]) -> dict[str, OptionText]:
    """``("num_layers=2", "layer_type=qwen3")`` -> ``{"num_layers": "2", "layer_type": "qwen3"}``.

    Values stay text (:class:`~speculators_core.options.OptionText`) until the algorithm is
    known: :func:`~speculators_core.options.resolve_training_options` converts each to the type
    the algorithm declares for it (or reads it as JSON, else a string, for an algorithm that
    declares no options).
    """
    return parse_key_values(pairs, flag="--algo-opt", example="ttt_steps=3")


def _json_object(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        data = json.loads(value)
    except json.JSONDecodeError as err:
        raise TrainingConfigError(f"'{value}' is not a JSON object: {err.msg}") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"'{value}' is not a JSON object")
    return data


def _option_for(field: dataclasses.Field[Any], hint: Any) -> click.Option:
    """A click option for one TrainingArguments field (default None = "not given")."""
    name = field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else None
    help_text = field.metadata.get("help", "")
    if default is not None and not isinstance(default, dict):
        help_text += (
            f"  [default: {str(default).lower() if isinstance(default, bool) else default}]"
        )
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if base is bool:
        return click.Option([f"--{name}/--no-{name}"], default=None, help=help_text)
    if typing.get_origin(base) is typing.Literal:
        return click.Option(
            [f"--{name}"], type=click.Choice(typing.get_args(base)), default=None, help=help_text
        )
    if typing.get_origin(base) is dict or base is dict:
        return click.Option([f"--{name}"], type=str, default=None, metavar="JSON", help=help_text)
    click_type = {int: int, float: float, str: str}.get(base, str)
    return click.Option([f"--{name}"], type=click_type, default=None, help=help_text)


def _training_options() -> list[click.Option]:
    hints = typing.get_type_hints(TrainingArguments)
    return [
        _option_for(f, hints[f.name])
        for f in dataclasses.fields(TrainingArguments)
        if f.name not in _SKIPPED_FIELDS
    ]


_TRAINING_FIELDS = [
    f.name for f in dataclasses.fields(TrainingArguments) if f.name not in _SKIPPED_FIELDS
]


def _run(
    *,
    config_file: Path | None,
    algo_opt: tuple[str, ...],
    loss: str | None,
    dry_run: bool,
    **values: Any,
) -> None:
    from speculators_core.train.distributed import DistributedContext
    from speculators_core.train.launch import (
        describe_run,
        load_config_file,
        prepare_run,
        resolve_run_config,
        run_training,
    )

    file_values = load_config_file(config_file) if config_file is not None else {}
    if values.get("optimizer_kwargs") is not None:
        values["optimizer_kwargs"] = _json_object(values["optimizer_kwargs"])
    # Flags that are off unless given must not override a config file's true.
    for flag in ("online", "overwrite", "resume"):
        if not values.get(flag):
            values[flag] = None
    config = resolve_run_config(
        file_values,
        values,
        with_flag_option(dict(parse_algo_options(algo_opt)), "objective", "--loss", loss),
    )
    ctx = DistributedContext.from_env(config.training.device)
    try:
        prepared = prepare_run(config, host=command_host(), ctx=ctx)
        if dry_run:
            if ctx.is_main:
                click.echo(json.dumps(describe_run(prepared), indent=2, sort_keys=True))
            return
        result = run_training(prepared)
        if ctx.is_main:
            state = result.state
            click.echo(
                f"trained {state.global_step} steps ({state.tokens_seen:,} tokens, "
                f"{state.epoch_progress:.2f} epochs); final model: {result.final_dir}"
            )
    finally:
        ctx.close()


def with_flag_option(
    algo_options: dict[str, Any], name: str, flag: str, value: Any
) -> dict[str, Any]:
    """A flag that is shorthand for the algorithm option ``name`` (``--loss`` for ``objective``,
    the quickstart's ``--ttt-steps`` for ``ttt_steps``), merged into ``algo_options``.

    Refused in one line when it and ``--algo-opt name=...`` disagree; an algorithm without the
    option refuses it itself, listing its options, when the options are resolved.
    """
    if value is None:
        return algo_options
    given = algo_options.get(name)
    if given is not None and str(given).strip() != str(value).strip():
        raise SpeculatorsError(
            f"{flag} {value} and --algo-opt {name}={given} disagree; pass one of them"
        )
    return {**algo_options, name: value}


def algorithm_options_help() -> list[str]:
    """The "Algorithm options" section of ``--help``: each installed algorithm's declared options.

    Asked only when help is shown. A plugin that fails to load is left out (the host logs it
    once); if the host itself fails (strict mode), the section says so instead of ``--help``
    failing.
    """
    try:
        algorithms = command_host().algorithms()
    except Exception as err:  # a broken plugin must never take --help down with it
        return [f"(could not list the installed algorithms: {err})"]
    if not algorithms:
        return ["(no algorithm plugin is installed)"]
    lines: list[str] = []
    for name, algorithm in sorted(algorithms.items()):
        described = describe_training_options(algorithm)
        if not described:
            lines.append(f"{name}: declares no options (values pass through unchecked)")
            continue
        lines.append(f"{name}:")
        lines.extend(f"  {line}" for line in described)
    return lines


class _TrainCommand(click.Command):
    """``speculators train``, whose help ends with the installed algorithms' options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Algorithm options (--algo-opt NAME=VALUE)"):
            margin = " " * formatter.current_indent
            width = max(formatter.width - formatter.current_indent, 40)
            for line in algorithm_options_help():
                body = line.lstrip()
                pad = margin + line[: len(line) - len(body)]
                # Wrapped by hand: click's write_text would join the lines into one paragraph.
                formatter.write(
                    click.formatting.wrap_text(
                        body, width, initial_indent=pad, subsequent_indent=pad + "    "
                    )
                    + "\n"
                )


def _build_command() -> click.Command:
    params: list[click.Parameter] = [
        click.Option(
            ["--algorithm"],
            default=None,
            help="Algorithm to train (an installed plugin's name, e.g. eagle3; see 'speculators plugins').",
        ),
        click.Option(
            ["--verifier"],
            type=click.Path(path_type=Path),
            default=None,
            help="Verifier model folder (the model the draft speculates for).",
        ),
        click.Option(
            ["--data"],
            type=click.Path(path_type=Path),
            default=None,
            help="Hidden-state store from 'speculators data hidden-states' (prepared data with --online).",
        ),
        click.Option(
            ["--val-data"],
            type=click.Path(path_type=Path),
            default=None,
            help="A separate validation store (default: val_fraction of --data is held out).",
        ),
        click.Option(
            ["--online"],
            is_flag=True,
            default=False,
            help="--data is prepared data (token ids + loss masks): the verifier computes hidden "
            "states during training, nothing is stored.",
        ),
        click.Option(
            ["--output"],
            type=click.Path(path_type=Path),
            default=None,
            help="Run folder: checkpoints/, metrics.jsonl, run_config.json and final/ (the "
            "speculators-format draft for 'vllm serve').",
        ),
        click.Option(
            ["--config", "config_file"],
            type=click.Path(path_type=Path),
            default=None,
            help="YAML or JSON file with any of these options (flags given here win).",
        ),
        click.Option(
            ["--num-layers"],
            type=click.IntRange(min=1),
            default=None,
            help="Draft decoder layers (passed to the algorithm as num_layers).",
        ),
        click.Option(
            ["--draft-vocab-size"],
            type=click.IntRange(min=1),
            default=None,
            help="Draft vocabulary size; the most frequent supervised tokens of --vocab (or of "
            "--data when --vocab is not given) are kept.",
        ),
        click.Option(
            ["--vocab"],
            type=click.Path(path_type=Path),
            default=None,
            help="Folder from 'speculators data vocab' (d2t.npy/t2d.npy or token_freq.json), or a "
            "token-frequency file.",
        ),
        click.Option(
            ["--algo-opt"],
            multiple=True,
            metavar="KEY=VALUE",
            help="An algorithm option (repeatable), converted to the type the algorithm declares "
            "(see 'Algorithm options' below; an unknown name is refused). For an algorithm that "
            "declares none, VALUE is read as JSON (3, true, [2,15,27]), else kept as a string. "
            "Example: --algo-opt ttt_steps=3 --algo-opt layer_type=qwen3.",
        ),
        click.Option(
            ["--loss"],
            default=None,
            metavar="SPEC",
            help="The training objective (the algorithm option 'objective'): a name, or a "
            "weighted mix such as kl=0.5,lk=0.5; 'speculators objectives' lists the installed "
            "ones (default: the algorithm's, forward KL for eagle3).",
        ),
        click.Option(
            ["--overwrite"],
            is_flag=True,
            default=False,
            help="Replace an existing output folder.",
        ),
        click.Option(
            ["--resume"],
            is_flag=True,
            default=False,
            help="Continue the run in --output from its newest checkpoint (starts fresh if it has none).",
        ),
        click.Option(
            ["--dry-run"],
            is_flag=True,
            default=False,
            help="Check everything, print the resolved config, parameter counts and data plan as "
            "JSON, and exit without training.",
        ),
        *_training_options(),
    ]

    def callback(**kwargs: Any) -> None:
        _run(**kwargs)

    return _TrainCommand(
        "train",
        callback=callback,
        params=params,
        help=_HELP,
        short_help="Train a draft model (any installed algorithm).",
        context_settings={"max_content_width": 100},
    )


#: The ``speculators train`` command (the root CLI adds it with ``cli.add_command``).
train_command = _build_command()
