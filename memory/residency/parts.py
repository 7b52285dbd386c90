"""A packed block's flat buffer split into a base and parts that can be copied on their own.

A streamed block normally moves to its GPU slot whole (one memcpy). When a forward reads only some
of a block's submodules (a one-token forward of a MoE block runs top-k of its experts), the
streamer can copy the base (everything not in a part) plus the parts that forward asks for.

``block_parts(packed, block, groups)`` partitions ``packed``'s tensors by the module subtrees
``groups`` (one part per group, in that order): a tensor is a part's when every reference to it
lives in that group's modules; a tensor referenced from outside the group (a bnb quantization map
shared by several Linears, anything the rest of the block also holds) stays in the base, which is
always copied. ``PackedBlock`` lays tensors out in module order, so one part is one contiguous run
of its buffer (one memcpy) unless something shared sits between its tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .weights import weight_tensors

Ranges = tuple[tuple[int, int], ...]  # [start, end) byte ranges of a block's flat buffer
_SHARED = -1


@dataclass(frozen=True)
class BlockParts:
    """Byte ranges of a block's buffer: ``base`` (always copied) and one entry of ``parts`` per group."""

    base: Ranges
    parts: tuple[Ranges, ...]
    total: int  # the whole buffer's bytes (one whole copy)

    @property
    def base_bytes(self) -> int:
        return _size(self.base)

    def part_bytes(self, i: int) -> int:
        return _size(self.parts[i])

    def ranges(self, ids: Sequence[int]) -> Ranges:
        """The ranges of parts ``ids``, adjacent ones merged (consecutive experts: one memcpy)."""
        return merge([r for i in sorted(ids) for r in self.parts[i]])


def _size(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def merge(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """Sorted ranges with touching or overlapping neighbours joined."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _runs(indices: Sequence[int], offsets: Sequence[int], nbytes: Sequence[int]) -> Ranges:
    """Byte ranges of tensors ``indices`` (sorted): consecutive tensors form one range, the alignment
    padding between them included (zeros: copying them is harmless and saves a memcpy)."""
    out: list[tuple[int, int]] = []
    prev = None
    for i in indices:
        end = offsets[i] + nbytes[i]
        if prev is not None and i == prev + 1:
            out[-1] = (out[-1][0], end)
        else:
            out.append((offsets[i], end))
        prev = i
    return tuple(out)


def block_parts(packed: Any, block: nn.Module, groups: Sequence[nn.Module]) -> tuple[BlockParts | None, str]:
    """(parts, "") for ``packed`` (a ``PackedBlock`` of ``block``) split by ``groups`` (submodules of
    ``block``), or (None, why) when it can not be split: then the block moves whole."""
    if not groups:
        return None, "no groups"
    inside = [{id(m) for m in g.modules()} for g in groups]
    members = set().union(*inside)
    if sum(len(s) for s in inside) != len(members):
        return None, "the groups overlap"
    owner: dict[tuple[int, str], int] = {}
    for gi, g in enumerate(groups):
        for w in weight_tensors(g):
            for r in w.refs:
                key = (id(r.owner), r.name)
                owner[key] = gi if owner.get(key, gi) == gi else _SHARED
    rest = [m for m in block.modules() if id(m) not in members]
    for w in weight_tensors(rest):  # direct tensors of the modules outside every group
        for r in w.refs:
            owner[(id(r.owner), r.name)] = _SHARED
    offsets, nbytes = packed.layout.offsets, packed.layout.nbytes
    base: list[int] = []
    per: list[list[int]] = [[] for _ in groups]
    for ti, w in enumerate(packed.tensors):
        found = {owner.get((id(r.owner), r.name)) for r in w.refs}
        if len(found) == 1 and (g := next(iter(found))) is not None and g != _SHARED:
            per[g].append(ti)
        else:
            base.append(ti)
    empty = [i for i, p in enumerate(per) if not p]
    if empty:
        return None, f"group {empty[0]} holds no weight of its own (its tensors are shared or not in the buffer)"
    return BlockParts(_runs(base, offsets, nbytes), tuple(_runs(p, offsets, nbytes) for p in per),
                      packed.layout.total), ""
