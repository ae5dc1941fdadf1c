"""``speculators convert SRC``: turn a third-party checkpoint into a speculators-format folder.

The converters themselves come from plugins (entry-point group ``speculators.converters``, hook
``speculators_register_converters``); this command only picks one and runs it. Without
``--from`` the source format is detected by asking every installed converter's ``detect``; no
match or several matches is a one-line error that lists the known formats.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from speculators_core.cli.plugin_host import command_host
from speculators_core.errors import PluginError, SpeculatorsError
from speculators_core.options import json_or_text, parse_key_value

__all__ = ["convert_command", "detect_format", "parse_option", "select_converter"]

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


def _known(converters: dict[str, Any]) -> str:
    return ", ".join(sorted(converters)) or "none"


def _no_converters() -> PluginError:
    return PluginError(
        "no checkpoint converters are installed; install speculators-converters "
        "(pip install -e plugins/converters) or a plugin that provides one"
    )


def detect_format(source: Path, converters: dict[str, Any]) -> Any:
    """The one converter whose ``detect`` accepts ``source``; a one-line error otherwise.

    ``converters`` maps names to :class:`~speculators_core.plugins.records.Converter` records.
    A ``detect`` that raises counts as "no match" (it is logged at debug level).
    """
    from speculators_core.config import CONFIG_NAME

    config: dict[str, Any] = {}
    config_file = source / CONFIG_NAME
    if config_file.is_file():
        try:
            loaded = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SpeculatorsError(
                f"'{config_file}' is not valid JSON ({err}); fix the source's config.json"
            ) from err
        if isinstance(loaded, dict):
            config = loaded
    matches = []
    for name, converter in sorted(converters.items()):
        try:
            if converter.detect(source, config):
                matches.append(name)
        except Exception as err:  # a detector must never take the command down
            logger.debug("converter %s could not inspect %s: %r", name, source, err)
    if not matches:
        raise SpeculatorsError(
            f"'{source}' is in no format an installed converter recognises (known formats: "
            f"{_known(converters)}); pass --from FORMAT if you know it"
        )
    if len(matches) > 1:
        raise SpeculatorsError(
            f"'{source}' matches several formats ({', '.join(matches)}; known formats: "
            f"{_known(converters)}); pass --from with the right one"
        )
    return converters[matches[0]]


def select_converter(source: Path, from_format: str | None, host: Any = None) -> Any:
    """The converter named by ``from_format``, or the one detected for ``source``."""
    if host is None:
        from speculators_core.plugins.host import get_host

        host = get_host()
    converters = host.converters()
    if not converters:
        raise _no_converters()
    if from_format is None:
        return detect_format(source, converters)
    if from_format not in converters:
        raise SpeculatorsError(
            f"unknown source format '{from_format}' (known formats: {_known(converters)}); "
            "pick one of them or install the plugin that provides it"
        )
    return converters[from_format]


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from ``--set``; the value is JSON when it parses, else a plain string."""
    key, raw = parse_key_value(text, flag="--set", example="norm_before_residual=true")
    return key, json_or_text(raw)


@click.command("convert")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--verifier",
    required=True,
    help="The verifier's local folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct.",
)
@click.option(
    "--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder to write."
)
@click.option(
    "--from",
    "from_format",
    default=None,
    help="Source format (a converter name); detected from the folder when left out.",
)
@click.option(
    "--validate",
    is_flag=True,
    help="Compare the converted draft's logits with the source's forward on random inputs, "
    "then lint the output with 'speculators check'.",
)
@click.option(
    "--dtype",
    type=click.Choice(_DTYPES),
    default=None,
    help="Cast floating-point weights (default: keep the source's dtype).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A converter option (JSON value), e.g. --set eagle_aux_hidden_state_layer_ids=[1,5,9]. "
    "Repeatable.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def convert_command(
    source: Path,
    verifier: str,
    output: Path,
    from_format: str | None,
    validate: bool,
    dtype: str | None,
    settings: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Convert the checkpoint folder SOURCE (EAGLE-1/2, HASS, EAGLE-3, older speculators) into
    the speculators format, for the verifier VERIFIER.

    The format is detected unless --from names it; 'speculators plugins' lists the installed
    converters. The output folder appears only when the conversion (and --validate) succeeded.
    """
    from speculators_core.assets import resolve_verifier_path

    if not source.is_dir():
        raise SpeculatorsError(f"source '{source}' is not a folder; pass a checkpoint folder")
    if output.exists() and not overwrite:
        raise SpeculatorsError(
            f"output folder '{output}' already exists; choose another path or pass --overwrite"
        )
    from speculators_core.conversion import run_conversion

    verifier_path = resolve_verifier_path(verifier)
    if not (verifier_path / "config.json").is_file():
        raise SpeculatorsError(
            f"verifier '{verifier}' is not a model folder (no config.json); pass the verifier's "
            "local folder or 'smollm2'"
        )
    options = dict(parse_option(s) for s in settings)
    host = command_host()
    converter = select_converter(source, from_format, host)
    result = run_conversion(
        converter,
        source,
        verifier=verifier_path,
        output=output,
        dtype=dtype,
        overwrite=overwrite,
        validate=validate,
        options=options,
        host=host,
    )
    if result is not None:
        click.echo(
            f"validated: max |logit difference| {result.max_abs_diff:.3g} (tolerance "
            f"{result.tolerance:.3g}), argmax agreement {result.argmax_agreement:.3f}; "
            "speculators check: clean",
            err=True,
        )
    click.echo(f"{output}: converted from {converter.name} to '{converter.algorithm}'")
