"""The one safetensors header parser, and how its three users treat a damaged file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hunyuan_image3.hunyuan_loader.checkpoint import layout, validate
from hunyuan_image3.hunyuan_loader.core.errors import CheckpointError


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "model.layers.0.b": torch.ones(5)}, str(path),
              metadata={"format": "pt"})
    return path


def test_parse_header(shard: Path) -> None:
    length, header = layout.parse_header(shard)
    assert struct.unpack("<Q", shard.read_bytes()[:8])[0] == length
    assert header["a"]["shape"] == [3, 4] and header["__metadata__"] == {"format": "pt"}
    assert validate._safetensors_expected_size(shard) == shard.stat().st_size
    entries = layout.read_header(shard)
    assert set(entries) == {"a", "model.layers.0.b"}
    assert entries["a"].start == 8 + length + header["a"]["data_offsets"][0] and entries["a"].nbytes == 24


def _damaged(shard: Path, how: str) -> Path:
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    bad = {"short": data[:5], "cut header": data[: 8 + length // 2],
           "not json": struct.pack("<Q", 4) + b"{no}" + data[8 + length:]}[how]
    out = shard.with_name(f"{how.replace(' ', '_')}.safetensors")
    out.write_bytes(bad)
    return out


@pytest.mark.parametrize("how", ["short", "cut header", "not json"])
def test_a_damaged_header(shard: Path, how: str) -> None:
    bad = _damaged(shard, how)
    with pytest.raises(ValueError):
        layout.parse_header(bad)
    assert validate._safetensors_expected_size(bad) == -1  # validation reports it as incomplete
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        layout.read_header(bad)


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        layout.parse_header(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError):
        layout.read_header(tmp_path / "absent.safetensors")
