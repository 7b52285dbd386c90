"""load/check.py: what a loader checks before the model is built or a weight read, and the plan it makes
against this machine's capacity (the most room a load could get), so that what it refuses the load
would refuse too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hunyuan_image3.hunyuan_loader.checkpoint.inspection import inspect_for_load
from hunyuan_image3.hunyuan_loader.checkpoint.layout import load_units
from hunyuan_image3.hunyuan_loader.core.errors import NotEnoughRAMError, NotEnoughVRAMError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.core.units import GIB
from hunyuan_image3.hunyuan_loader.load import blocks, check, multi_gpu

FORMATS = [("bf16", "w8a16"), ("int8", "bnb"), ("nf4", "w8a16"), ("int8", "w8a16")]


@pytest.mark.parametrize(("quant", "fmt"), FORMATS)
def test_header_sizes_are_the_sizes_the_load_plans(base_checkpoint: Path, quant: str, fmt: str) -> None:
    """Quantizing: exactly the skeleton's placed bytes (the load's plan); bf16: the header sizes the
    load plans with before its skeleton (at least the placed bytes)."""
    spec = LoadSpec(str(base_checkpoint), quant=quant, int8_format=fmt)
    found = inspect_for_load(spec.path, spec.quant, spec.int8_format)
    layout, weight_format = found.layout, found.weight_format
    mine_blocks, mine_other, _ = check.header_sizes(layout, weight_format,
                                                    weight_format.quantized and not found.pre_quantized)
    qconfig = found.quantization_config
    sk = blocks.build_skeleton(found.loadable, layout, quant, qconfig, torch.device("cpu"))
    units = load_units(layout, sk.to_load)
    real = dict(zip([u.block for u in units], blocks.unit_bytes(sk, units)))
    real_blocks, real_other = [real[i] for i in range(len(mine_blocks))], real[None]
    if qconfig is None:
        assert all(m >= r for m, r in zip(mine_blocks, real_blocks)) and mine_other >= real_other
    else:
        assert (mine_blocks, mine_other) == (real_blocks, real_other)


def _on_a_gpu(monkeypatch, capacity: int) -> None:
    """Plan as on one GPU of ``capacity`` bytes with nothing free now (a CPU machine has neither)."""
    monkeypatch.setattr(check, "primary_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(check, "handled_here", lambda spec: False)
    monkeypatch.setattr(check, "capacity_vram", lambda device: capacity)
    monkeypatch.setattr(check, "gpu_staging_bytes", lambda layout: 0)
    from hunyuan_image3.memory import stats

    monkeypatch.setattr(stats, "usable_vram", lambda snap=None: 0)  # what is free now must not matter


def test_the_plan_is_made_against_the_gpus_capacity(base_checkpoint: Path, monkeypatch) -> None:
    found = inspect_for_load(str(base_checkpoint), "bf16")
    sizes, other, _ = check.header_sizes(found.layout, found.weight_format, False)
    card = other + 3 * max(sizes) + 4096  # two streaming slots and one resident block, not all of them
    assert len(sizes) > 3
    _on_a_gpu(monkeypatch, capacity=card)
    with pytest.raises(NotEnoughVRAMError, match="offload_mode smart"):
        check.check_load(LoadSpec(str(base_checkpoint)))  # disabled: every weight on the GPU
    # smart streams what the card cannot hold: planned with the card's memory, not what is free now (0)
    placement = check.check_load(LoadSpec(str(base_checkpoint), offload="smart", headroom_gb=1e-6)).placement
    assert placement is not None and placement.streamed and placement.plan.gpu_bytes <= card
    _on_a_gpu(monkeypatch, capacity=4 * GIB)
    assert not check.check_load(LoadSpec(str(base_checkpoint), headroom_gb=1e-6)).placement.streamed


def test_ram_is_checked_against_the_limit_and_nothing_is_read(base_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setenv("HUNYUAN_RAM_LIMIT_GB", "0.001")
    monkeypatch.setattr(blocks, "materialise", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(NotEnoughRAMError, match="Nothing was read"):
        check.check_load(LoadSpec(str(base_checkpoint), quant="int8"))


def test_several_devices_are_planned_as_the_load_plans_them(base_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")  # two logical parts on the CPU (tests)
    result = check.check_load(LoadSpec(str(base_checkpoint), devices="cpu,cpu", multi_gpu="split"))
    assert result.variant.name == "base" and result.placement is not None
    assert result.placement.layout == "split" and len(result.placement.devices) == 2
