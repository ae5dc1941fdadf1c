"""Writing a converted speculator: the expected tensors, their checks, and the streamed output.

The layout a converted folder must have is taken from the target model class itself: the class
is instantiated on PyTorch's ``meta`` device (no memory, no initialization) from the converted
config, and its ``state_dict`` minus ``_keys_to_ignore_on_save`` gives every tensor's name and
shape. Each converter maps those names to source tensors; :func:`write_speculator` checks the
mapping (missing tensor, wrong shape, unknown leftovers) before anything is written, then writes
``config.json`` through the config class and ``model.safetensors`` tensor by tensor, inside a
temporary folder renamed into place only when everything (including validation) succeeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from speculators_converters.source import SourceCheckpoint
from speculators_core import SpeculatorModel, SpeculatorModelConfig
from speculators_core.errors import ConversionError
from speculators_core.safetensors_io import StreamingSafetensorsWriter, TensorLayout

__all__ = [
    "TensorPlan",
    "expected_tensors",
    "plan_tensors",
    "resolve_output_dtype",
    "write_speculator",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, the source tensor it comes from, its output dtype and shape.

    ``elements`` ``(start, stop)``: only that range of the flattened source tensor (a row block
    of a fused tensor, such as one projection of a ``qkv_proj``); None: all of it.
    """

    name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    elements: tuple[int, int] | None = None


def _element_range(pieces: Iterator[torch.Tensor], start: int, stop: int) -> Iterator[torch.Tensor]:
    """The elements ``start..stop-1`` of a tensor given as consecutive flat pieces."""
    offset = 0
    for piece in pieces:
        end = offset + piece.numel()
        if end > start and offset < stop:
            yield piece[max(0, start - offset) : min(piece.numel(), stop - offset)]
        offset = end
        if offset >= stop:
            return


def expected_tensors(
    model_class: type[SpeculatorModel], config: SpeculatorModelConfig
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a saved ``model_class(config)`` holds."""
    with torch.device("meta"):
        model = model_class(config)
    ignored = set(model._keys_to_ignore_on_save or ())
    return {
        name: (tuple(t.shape), t.dtype)
        for name, t in model.state_dict().items()
        if name not in ignored
    }


def resolve_output_dtype(
    source: SourceCheckpoint, requested: torch.dtype | None, names: list[str]
) -> torch.dtype:
    """The floating-point dtype of the output: ``requested`` (the core's ``--dtype``), else
    the source's own.

    The source's own is the one dtype its float tensors (among ``names``) share; a source with
    mixed float dtypes keeps the dtype of its largest tensor.
    """
    if requested is not None:
        return requested
    floats = [source.tensors[n] for n in names if source.tensors[n].dtype.is_floating_point]
    if not floats:
        return torch.float32
    dtypes = {t.dtype for t in floats}
    if len(dtypes) == 1:
        return dtypes.pop()
    largest = max(floats, key=lambda t: torch.Size(t.shape).numel())
    logger.warning(
        "source '%s' mixes float dtypes (%s); writing %s (the dtype of its largest tensor)",
        source.folder,
        ", ".join(sorted(str(d) for d in dtypes)),
        largest.dtype,
    )
    return largest.dtype


def plan_tensors(
    source: SourceCheckpoint,
    mapping: Mapping[str, str],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    optional: frozenset[str] = frozenset(),
    dropped: frozenset[str] = frozenset(),
    float_dtype: torch.dtype,
    describe: str,
) -> list[TensorPlan]:
    """Check the mapping ``output name -> source name`` against ``expected`` and the source.

    * every expected tensor not in ``optional`` must be mapped to a source tensor that exists;
    * every mapped tensor must have the expected shape;
    * every source tensor must be mapped or listed in ``dropped`` (nothing is lost silently).

    ``describe`` names the source format in messages (``"SafeAILab EAGLE-3"``).
    """
    folder = source.folder
    for out_name, (shape, _) in expected.items():
        src = mapping.get(out_name)
        if src is None or not source.has(src):
            if out_name in optional:
                continue
            wanted = src or out_name
            raise ConversionError(
                f"{describe} checkpoint '{folder}' lacks tensor '{wanted}' (needed for "
                f"'{out_name}' {list(shape)}); the checkpoint is incomplete, re-download or re-save it"
            )
    plans: list[TensorPlan] = []
    used: set[str] = set()
    for out_name, src in sorted(mapping.items()):
        if out_name not in expected:
            raise ConversionError(
                f"internal: converter maps '{src}' to '{out_name}', which the target has no place for"
            )
        if not source.has(src):
            continue  # optional and absent
        shape, dtype = expected[out_name]
        got = source.tensors[src].shape
        if tuple(got) != tuple(shape):
            raise ConversionError(
                f"{describe} checkpoint '{folder}': tensor '{src}' has shape {list(got)} but the "
                f"config implies {list(shape)}; the weights and config.json disagree, fix one of them"
            )
        src_dtype = source.tensors[src].dtype
        if dtype.is_floating_point:
            if not src_dtype.is_floating_point:
                raise ConversionError(
                    f"{describe} checkpoint '{folder}': tensor '{src}' has dtype {src_dtype}, "
                    "expected a floating-point dtype; re-save the checkpoint"
                )
            out_dtype = float_dtype
        else:
            if src_dtype.is_floating_point or src_dtype.is_complex:
                raise ConversionError(
                    f"{describe} checkpoint '{folder}': tensor '{src}' has dtype {src_dtype}, "
                    f"expected {dtype}; re-save the checkpoint"
                )
            out_dtype = dtype  # d2t stays int64, t2d bool
        plans.append(TensorPlan(out_name, src, out_dtype, tuple(shape)))
        used.add(src)
    leftovers = sorted(set(source.tensors) - used - dropped)
    if leftovers:
        more = f" (and {len(leftovers) - 1} more)" if len(leftovers) > 1 else ""
        raise ConversionError(
            f"{describe} checkpoint '{folder}' has tensor '{leftovers[0]}'{more}, which this "
            "converter does not know where to put; check --from (it may be another format)"
        )
    return plans


def _write_weights(path: Path, source: SourceCheckpoint, plans: list[TensorPlan]) -> None:
    layouts = [TensorLayout(p.name, p.dtype, p.shape) for p in plans]
    total = sum(layout.nbytes for layout in layouts)
    with (
        StreamingSafetensorsWriter(path, layouts) as writer,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="converting",
            disable=None,  # shown on a terminal only
            leave=False,
        ) as progress,
    ):
        for plan, layout in zip(plans, layouts, strict=True):
            # The writer casts each chunk to the planned dtype (float casts, and a t2d saved as
            # 0/1 integers to bool), so a cast never holds more than one chunk.
            pieces = source.chunks(plan.source)
            if plan.elements is not None:
                pieces = _element_range(pieces, *plan.elements)
            writer.write(plan.name, pieces)
            progress.update(layout.nbytes)


def write_speculator(
    output: str | os.PathLike[str],
    *,
    config: SpeculatorModelConfig,
    model_class: type[SpeculatorModel],
    source: SourceCheckpoint,
    plans: list[TensorPlan],
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the folder ``output``.

    ``output`` is the temporary folder the core's conversion gives the converter (the core
    renames it into place once the conversion and any validation passed).
    """
    output = Path(output)
    config.architectures = [model_class.__name__]
    float_dtypes = {p.dtype for p in plans if p.dtype.is_floating_point}
    if len(float_dtypes) == 1:
        config.dtype = str(float_dtypes.pop()).removeprefix("torch.")
    config.save_pretrained(output)
    _write_weights(output / "model.safetensors", source, plans)
    return output
