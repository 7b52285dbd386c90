"""The adopt step of the load pipeline: the residency a placed model gets, by its LoadPlacement's
layout. One device: a ResidencyManager over the resident and the already packed blocks. A split
(``layout="split"``): one manager per device over its run of blocks, the activation moves at the
boundaries (``hooks/split_exec.SplitResidency``). CFG-parallel: the first device's manager plus a decoder
replica on each other device (``hooks/cfg_parallel.CfgParallelResidency``). Every one is a
``memory.residency.Residency``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ...memory import devices as dv
from ...memory.residency.protocol import Residency
from ..hooks.cfg_parallel import CfgParallelResidency
from ..hooks.split_exec import SplitResidency
from .placement import LoadPlacement, adopt_load


def adopt(model: nn.Module, placement: LoadPlacement, packed: Mapping[int, Any], *,
          prepare_replica: Callable[[nn.Module], None] | None = None) -> Residency | None:
    """The residency of a model just placed as ``placement`` says (streamed blocks already in their
    pinned buffers ``packed``); None on a CPU device. ``prepare_replica(decoder)``: what a CFG-parallel
    replica needs installed (the MoE dispatch). On a failure, what was built is closed."""
    if placement.layout == "split":
        return _adopt_split(model, placement.split, packed)
    manager = adopt_load(model, placement, packed)
    if placement.layout != "cfg_parallel":
        return manager
    try:
        return CfgParallelResidency(model, manager, placement.devices, prepare_replica=prepare_replica)
    except BaseException:
        manager.close()
        raise


def _adopt_split(model: nn.Module, split: dv.SplitPlan, packed: Mapping[int, Any]) -> SplitResidency:
    residency = SplitResidency(model, model.model.layers, split)
    try:
        for manager, (start, stop) in zip(residency.managers, split.ranges):
            mine = {i - start: pb for i, pb in packed.items() if start <= i < stop}
            if mine:
                manager.adopt_packed(mine)
        residency.apply_split()
    except BaseException:
        residency.close()
        raise
    return residency
