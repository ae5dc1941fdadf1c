"""Running a checkpoint converter with the promises ``speculators convert`` makes.

A converter (a plugin's :class:`~speculators_core.plugins.records.Converter`) only reads its
source and maps it: it writes a speculators-format folder into the folder it is given and returns
the source's own forward. The core keeps every promise the user guide makes, the same for every
converter:

* **atomic output**: the converter writes into a fresh temporary folder next to the target, which
  is renamed into place only when everything below passed; on any failure nothing is left;
* ``--overwrite``: an existing target is refused before any work, or replaced at the end;
* ``--dtype``: the converter is asked for that floating-point dtype, and the core checks every
  floating-point tensor of the result has it (a converter that ignores it is an error);
* ``--validate``: the core reloads the result through the plugin host, compares its
  :meth:`~speculators_core.model.SpeculatorModel.draft_logits` with the converter's
  :class:`ReferenceForward` on random inputs, then lints the folder (``speculators check``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from speculators_core.errors import ConversionError
from speculators_core.fsutil import atomic_directory

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost
    from speculators_core.plugins.records import Converter

__all__ = [
    "FLOAT_DTYPES",
    "ReferenceForward",
    "ValidationResult",
    "compare_logits",
    "run_conversion",
    "validate_conversion",
]

logger = logging.getLogger(__name__)

#: ``--dtype`` names and the torch dtypes they select.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ReferenceForward:
    """The source checkpoint's own forward, which a converter returns for ``--validate``.

    ``forward(input_ids, features)`` takes verifier token ids ``[B, T]`` (int64) and random
    verifier features ``[B, T, feature_width]`` (float64) and returns the source's draft logits
    over the verifier vocabulary, float64 ``[B, T, vocab_size]``, ``-inf`` for tokens the draft
    cannot propose: the same quantity as the converted model's
    :meth:`~speculators_core.model.SpeculatorModel.draft_logits`, computed independently from
    the source tensors (written at the dtype the output was written in).
    ``expected_findings`` are ``speculators check`` codes that are expected for this output
    (for example a format vLLM does not serve directly).
    """

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    feature_width: int
    vocab_size: int
    expected_findings: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ValidationResult:
    """How closely the converted draft reproduced the source's logits."""

    max_abs_diff: float
    scale: float
    tolerance: float
    argmax_agreement: float


def compare_logits(reference: torch.Tensor, converted: torch.Tensor) -> ValidationResult:
    """Compare two ``[B, T, V]`` logit tensors; a :class:`ConversionError` when they differ.

    The two must propose the same tokens (the same finite entries) and agree within
    ``1e-3 * max(1, largest |logit|)``.
    """
    if reference.shape != converted.shape:
        raise ConversionError(
            f"validation failed: the converted draft gives logits of shape {tuple(converted.shape)}, "
            f"the source's forward {tuple(reference.shape)}; the conversion maps another vocabulary"
        )
    finite_ref, finite_conv = torch.isfinite(reference), torch.isfinite(converted)
    if not torch.equal(finite_ref, finite_conv):
        raise ConversionError(
            "validation failed: the converted draft proposes other verifier tokens "
            "than the source (its d2t vocabulary mapping differs); check the source's d2t/t2d"
        )
    ref, conv = reference[finite_ref], converted[finite_ref]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((ref - conv).abs().max()) if ref.numel() else 0.0
    tolerance = 1e-3 * max(1.0, scale)
    agreement = float((reference.argmax(-1) == converted.argmax(-1)).double().mean())
    if not diff <= tolerance:
        raise ConversionError(
            "validation failed: the converted draft's logits differ from the "
            f"source's forward by up to {diff:.3g} (largest logit {scale:.3g}, tolerance "
            f"{tolerance:.3g}); the conversion does not reproduce this checkpoint"
        )
    return ValidationResult(diff, scale, tolerance, agreement)


def validate_conversion(
    folder: Path,
    verifier: Path,
    reference: ReferenceForward,
    *,
    host: PluginHost | None = None,
    seed: int = 0,
) -> ValidationResult:
    """Reload ``folder`` through ``host``, compare with ``reference``, then lint the folder."""
    from transformers.utils import logging as hf_logging

    from speculators_core.check import check_checkpoint
    from speculators_core.loading import load_speculator
    from speculators_core.plugins.host import get_host

    host = host if host is not None else get_host()  # one host reloads and lints
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # validation is one step of the command: stay quiet
    try:
        model = load_speculator(folder, host=host, verifier=verifier, dtype=torch.float32)
    except Exception as err:
        raise ConversionError(
            f"validation failed: the converted folder does not reload ({type(err).__name__}: {err})"
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, reference.vocab_size, (2, 7), generator=generator)
    features = torch.randn(2, 7, reference.feature_width, generator=generator, dtype=torch.float64)
    expected = reference.forward(input_ids, features)
    try:
        got = model.draft_logits(input_ids, features)
    except NotImplementedError as err:
        raise ConversionError(
            f"validation failed: {err}; --validate needs the algorithm's draft_logits"
        ) from err
    result = compare_logits(expected, got)
    report = check_checkpoint(folder, host=host, verifier=verifier)
    problems = [f for f in report.findings if f.code not in reference.expected_findings]
    if problems:
        raise ConversionError(f"validation failed: speculators check: {problems[0]}")
    return result


def _float_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """Tensor name -> dtype of every floating-point tensor in ``folder``'s safetensors files."""
    from speculators_core.safetensors_io import read_header

    found: dict[str, torch.dtype] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, entry in read_header(file).items():
            if entry.dtype.is_floating_point:
                found[name] = entry.dtype
    return found


def run_conversion(
    converter: Converter,
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: str | None = None,
    overwrite: bool = False,
    validate: bool = False,
    options: Mapping[str, Any] | None = None,
    host: PluginHost | None = None,
) -> ValidationResult | None:
    """Convert ``source`` into the speculators folder ``output`` with ``converter``.

    ``dtype`` is a key of :data:`FLOAT_DTYPES` (None keeps the source's); ``options`` go to
    the converter. Returns the validation result when ``validate``. Every failure is a
    one-line :class:`ConversionError` (or the converter's own one-line error) and leaves
    ``output`` as it was.
    """
    source, verifier, output = Path(source), Path(verifier), Path(output)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"dtype '{dtype}' is not supported; use one of {', '.join(FLOAT_DTYPES)}"
        )
    if output.exists() and not overwrite:
        raise ConversionError(
            f"output folder '{output}' already exists; choose another path or pass --overwrite"
        )
    wanted = FLOAT_DTYPES[dtype] if dtype is not None else None
    result: ValidationResult | None = None
    with atomic_directory(output, overwrite=overwrite) as tmp:
        reference = converter.convert(
            source, verifier=verifier, output=tmp, dtype=wanted, **dict(options or {})
        )
        if not (tmp / "config.json").is_file():
            raise ConversionError(
                f"converter '{converter.name}' ({converter.provided_by}) wrote no config.json; "
                "report this to the plugin's authors"
            )
        if wanted is not None:
            written = _float_dtypes(tmp)
            other = sorted(n for n, d in written.items() if d != wanted)
            if other:
                raise ConversionError(
                    f"converter '{converter.name}' ({converter.provided_by}) ignored --dtype "
                    f"{dtype}: tensor '{other[0]}' is {written[other[0]]}; report this to the "
                    "plugin's authors"
                )
        if validate:
            if not isinstance(reference, ReferenceForward):
                raise ConversionError(
                    f"converter '{converter.name}' ({converter.provided_by}) supplies no reference "
                    "forward, so --validate cannot check its output; convert without --validate "
                    "and run 'speculators check'"
                )
            result = validate_conversion(tmp, verifier, reference, host=host)
            logger.info(
                "validated: max |logit difference| %.3g (tolerance %.3g), argmax agreement %.3f",
                result.max_abs_diff,
                result.tolerance,
                result.argmax_agreement,
            )
    return result
