"""Where each tensor of a safetensors checkpoint lies on disk, and how it groups into load units.

Read from the shard headers only (a few KB per shard), before any weight: the load plan
(how many blocks fit the budget, how much RAM the streamed ones need) is made from this.

Why not ``safe_open``: it exposes names, dtypes and shapes but not the byte offsets, and we
read the tensors ourselves (see ``tensor_reader.py``). The header format is the published
one: an 8-byte little-endian length, then a JSON object ``name -> {dtype, shape,
data_offsets}`` with offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class LoadUnit:
    """The tensors materialised together: the non-block parts (``block is None``) or one decoder block."""

    block: int | None
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def label(self) -> str:
        return "non-block modules" if self.block is None else f"block {self.block}"


def block_of(name: str) -> int | None:
    """Decoder block index of a tensor name (``model.layers.N.*``), else None."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def parse_header(file: Path) -> tuple[int, dict[str, Any]]:
    """The header of a .safetensors file: (its length in bytes, its JSON object), the one parser of
    the format (layout, checkpoint validation, the card planner). ValueError when the file is too
    short for its header or the header is not JSON; OSError when the file cannot be read."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{len(head)} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        header = fh.read(length)
    if len(header) < length:
        raise ValueError(f"the header says {length} bytes but the file ends after {len(header)}")
    return length, json.loads(header)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Tensor entries of one .safetensors file (header only)."""
    try:
        length, header = parse_header(file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}). Re-download it.") from exc
    base = 8 + length
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file.name}: tensor {name} has dtype {meta['dtype']}, which this pack cannot load.")
        begin, end = meta["data_offsets"]
        out[name] = TensorEntry(name, file, dtype, tuple(meta["shape"]), base + begin, end - begin)
    return out


def read_layout(shard_files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint (all shards), by name."""
    layout: dict[str, TensorEntry] = {}
    for file in shard_files:
        layout.update(read_header(Path(file)))
    return layout


def load_units(layout: dict[str, TensorEntry], names: Sequence[str] | None = None) -> list[LoadUnit]:
    """Units in materialisation order: the non-block parts first, then blocks 0, 1, 2, ...

    Inside a unit, tensors are in file order (file, offset), so each unit is read as
    sequentially as the checkpoint allows.
    """
    wanted = layout.keys() if names is None else names
    groups: dict[int | None, list[TensorEntry]] = {}
    for name in wanted:
        entry = layout[name]
        groups.setdefault(block_of(name), []).append(entry)
    order = ([None] if None in groups else []) + sorted(k for k in groups if k is not None)
    return [
        LoadUnit(k, tuple(sorted(groups[k], key=lambda e: (str(e.file), e.start)))) for k in order
    ]
