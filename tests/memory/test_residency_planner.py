"""Planner: which blocks stay on the GPU, which stream (CPU only)."""

from __future__ import annotations

import pytest

from hunyuan_image3.memory.residency import (
    InsufficientVRAMError,
    Placement,
    ResidencyPlan,
    evenly_spaced,
    plan_placement,
)

GB = 10**9
BLOCKS = [5 * GB] * 10


def test_everything_fits_resident():
    plan = plan_placement(BLOCKS, 2 * GB, 100 * GB, 10 * GB)
    assert plan.streamed == [] and len(plan.resident) == 10
    assert plan.gpu_bytes == 62 * GB and plan.slot_bytes == 0
    assert "10/10 blocks resident" in plan.describe()


def test_exact_fit_and_one_byte_short():
    exact = plan_placement(BLOCKS, 2 * GB, 62 * GB, 10 * GB)
    assert exact.streamed == [] and exact.gpu_bytes == 62 * GB
    short = plan_placement(BLOCKS, 2 * GB, 62 * GB - 1, 10 * GB)
    # streaming 1 or 2 blocks through 2 slots saves nothing: 3 must stream
    assert len(short.streamed) == 3
    assert short.gpu_bytes == 2 * GB + 7 * 5 * GB + 2 * 5 * GB + 10 * GB <= 62 * GB - 1


def test_fewest_streamed_blocks_for_budget():
    plan = plan_placement(BLOCKS, 2 * GB, 42 * GB, 0)  # 2 + 5 * (10 - k) + 10 <= 42 -> k = 4
    assert len(plan.streamed) == 4
    assert plan.streamed == evenly_spaced(10, 4) == [1, 4, 6, 9]
    assert plan.n_slots == 2 and plan.slot_bytes == 5 * GB
    assert plan.placements[9] is Placement.STREAM and plan.placements[0] is Placement.GPU
    assert "4 streamed [1, 4, 6, 9] via 2 x" in plan.describe()


def test_all_streamed_exact_fit():
    plan = plan_placement(BLOCKS, 2 * GB, 12 * GB + GB, GB)
    assert len(plan.streamed) == 10 and plan.gpu_bytes == 13 * GB


def test_impossible_budget_names_the_numbers():
    with pytest.raises(InsufficientVRAMError) as err:
        plan_placement(BLOCKS, 2 * GB, 13 * GB - 1, GB)
    text = str(err.value)
    assert "all 10 blocks streamed" in text and "2 streaming slots" in text and "headroom" in text


def test_slot_count_and_min_streamed():
    plan = plan_placement(BLOCKS, 0, 10**15, 0, prefetch_slots=3, min_streamed=5)
    assert len(plan.streamed) == 5 and plan.n_slots == 3
    one = plan_placement([GB], 0, GB, 0)
    assert one.streamed == []
    with pytest.raises(ValueError):
        plan_placement(BLOCKS, 0, GB, 0, prefetch_slots=0)


def test_uneven_blocks_slot_is_largest_streamed():
    blocks = [GB, 3 * GB, GB, 2 * GB]
    plan = plan_placement(blocks, 0, 6 * GB, 0)
    assert plan.gpu_bytes <= 6 * GB
    assert plan.slot_bytes == max(blocks[i] for i in plan.streamed)


def test_evenly_spaced():
    assert evenly_spaced(32, 0) == []
    assert evenly_spaced(32, 32) == list(range(32))
    s = evenly_spaced(32, 13)
    assert len(s) == 13 and s[-1] == 31
    gaps = [b - a for a, b in zip(s, s[1:])]
    assert max(gaps) - min(gaps) <= 1


def test_uniform_and_parked_plan():
    parked = ResidencyPlan.uniform(Placement.CPU, BLOCKS, GB)
    assert parked.parked and parked.gpu_bytes == 0 and "parked" in parked.describe()
    res = ResidencyPlan.uniform(Placement.GPU, BLOCKS, GB)
    assert res.gpu_weight_bytes == 51 * GB
