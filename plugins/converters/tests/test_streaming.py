"""The streaming pieces: the safetensors writer/reader, chunked reads, the pickle reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from speculators_converters import SourceCheckpoint

from speculators_core import get_host
from speculators_core.errors import ConversionError
from speculators_core.safetensors_io import (
    StreamingSafetensorsWriter,
    TensorLayout,
    read_chunks,
    read_header,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(7, 5, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c": torch.arange(11, dtype=torch.int64),
        "d": torch.tensor([True, False, True]),
        "e": torch.randn(2, 3, 4, generator=gen).to(torch.float16),
    }


def test_writer_output_reads_back_with_safetensors(tmp_path: Path) -> None:
    """Written in small chunks (with casts), read back by the safetensors library itself."""
    tensors = _tensors()
    layouts = [TensorLayout(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    layouts[0] = TensorLayout("a", torch.bfloat16, (7, 5))  # cast while writing
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", layouts) as writer:
        for layout in layouts:
            flat = tensors[layout.name].reshape(-1)
            writer.write(layout.name, (flat[i : i + 4] for i in range(0, flat.numel(), 4)))
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(loaded["a"], tensors["a"].to(torch.bfloat16))
    for name in "bcde":
        assert loaded[name].dtype == tensors[name].dtype and torch.equal(
            loaded[name], tensors[name]
        )


def test_writer_refuses_short_tensors(tmp_path: Path) -> None:
    writer = StreamingSafetensorsWriter(
        tmp_path / "x.safetensors", [TensorLayout("a", torch.float32, (4,))]
    )
    with pytest.raises(ConversionError, match="gave 8 bytes but its shape"):
        writer.write("a", [torch.zeros(2)])
    writer._handle.close()


def test_chunked_reads_concatenate_to_the_tensor(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "x.safetensors"))
    header = read_header(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        pieces = [p.clone() for p in read_chunks(header[name], chunk_bytes=8)]
        assert all(p.numel() * p.element_size() <= 8 for p in pieces)
        assert torch.equal(torch.cat(pieces).reshape(tensor.shape), tensor)


def test_truncated_header_and_data_are_reported(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(ConversionError, match="is truncated: tensor"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(ConversionError, match="truncated or not a safetensors file"):
        read_header(tmp_path / "head.safetensors")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_pytorch_bin_is_read_weights_only(zipped: bool, tmp_path: Path) -> None:
    """Both torch.save formats are read; chunks of a memory-mapped tensor are exact."""
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    source = SourceCheckpoint(tmp_path)
    assert source.kind == "bin"
    assert {n: (t.dtype, t.shape) for n, t in source.tensors.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()
    }
    for name, tensor in tensors.items():
        assert torch.equal(
            torch.cat([c.clone() for c in source.chunks(name, 8)]).reshape(tensor.shape), tensor
        )
        assert torch.equal(source.read(name), tensor)


def test_sharded_index_naming_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "gone.safetensors"}}'
    )
    with pytest.raises(ConversionError, match=r"names shard 'gone\.safetensors', which is missing"):
        SourceCheckpoint(tmp_path)


def test_no_weights_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="has no weights"):
        SourceCheckpoint(tmp_path)


def test_the_plugin_registers_its_five_converters() -> None:
    """Through the core's plugin host (entry point speculators.converters)."""
    converters = get_host().converters()
    assert {n: c.algorithm for n, c in converters.items()} == {
        "safeailab-eagle": "eagle",
        "safeailab-eagle3": "eagle3",
        "speculators-eagle": "eagle",
        "speculators-eagle3": "eagle3",
        "zlab-dflash": "dflash",
    }
    assert all(c.provided_by.startswith("speculators-converters") for c in converters.values())
