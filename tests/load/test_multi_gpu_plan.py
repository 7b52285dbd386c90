"""Several GPUs, planned on the CPU: the devices input, the split and CFG-parallel plans with the real
model's block sizes on fake cards of 24-96 GB (1, 2 and 4 of them), and the mode auto picks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from hunyuan_image3.hunyuan_loader.cli import card_plan as cp
from hunyuan_image3.hunyuan_loader.core.errors import InputError, NotEnoughVRAMError
from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
from hunyuan_image3.hunyuan_loader.load import multi_gpu
from hunyuan_image3.memory import devices as dv
from hunyuan_image3.memory.estimator import estimate_inference_gb
from hunyuan_image3.memory.residency.planner import InsufficientVRAMError, Placement, plan_placement

GIB = dv.GIB
SIZES = cp.real_model_sizes()
HEADROOM = int(estimate_inference_gb(1024, 1024, moe_impl="gather_scatter") * GIB)


def cards(n: int, gib: float) -> tuple[list[str], list[int]]:
    return [f"cuda:{i}" for i in range(n)], [int(gib * GIB)] * n


def check_invariants(plan: dv.SplitPlan, sizes, other: int, rooms) -> None:
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == len(sizes)
    for (_, b), (c, _) in zip(plan.ranges, plan.ranges[1:]):
        assert b == c  # contiguous runs in block order
    for d, part in enumerate(plan.plans):
        assert part.gpu_bytes <= rooms[d], (d, part.gpu_bytes, rooms[d])
        assert part.other_bytes == (other if d == 0 else 0)
    assert sum(1 for p in plan.plans if p.streamed) <= 1  # at most one device pays for streaming slots
    assert len(plan.block_devices) == len(sizes)
    assert plan.streamed_bytes == sum(sizes[i] for i in plan.streamed)


# -- the devices input ------------------------------------------------------------------------------
def test_devices_syntax_and_normal_form(monkeypatch) -> None:
    monkeypatch.delenv(multi_gpu.LOGICAL_ENV, raising=False)
    assert multi_gpu.parse_devices("auto") is None and multi_gpu.parse_devices("") is None
    assert multi_gpu.normalise_devices(" CUDA:0, cuda:1 ") == "cuda:0,cuda:1"
    assert multi_gpu.normalise_devices("0,2") == "cuda:0,cuda:2"
    for bad, words in (("gpu0", "not a GPU name"), ("cuda:0,,cuda:1", "not a GPU name"),
                       ("cuda:0,cuda:0", "twice"), ("cpu", "lists 'cpu'")):
        with pytest.raises(InputError, match=words):
            multi_gpu.parse_devices(bad)
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")  # tests and the one-GPU bench: two parts on one device
    assert multi_gpu.parse_devices("cpu,cpu") == ("cpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_the_machine_lacks_is_refused_before_loading(tmp_path) -> None:
    with pytest.raises(InputError, match=r"cuda:3 does not exist \(no CUDA GPU is visible"):
        LoadSpec(str(tmp_path), devices="cuda:3")
    assert multi_gpu.resolve_devices("auto") == [torch.device("cpu")]


def test_loadspec_devices_and_mode_checks(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(multi_gpu.LOGICAL_ENV, "1")
    a = LoadSpec(str(tmp_path), devices="cpu, cpu", multi_gpu="split")
    assert a == LoadSpec(str(tmp_path), devices="CPU,cpu", multi_gpu="split")  # one cache key
    assert a.devices == "cpu,cpu" and "devices cpu,cpu, multi_gpu split" in a.describe()
    assert LoadSpec(str(tmp_path)).devices == "auto"
    with pytest.raises(InputError, match="multi_gpu 'both'"):
        LoadSpec(str(tmp_path), multi_gpu="both")
    with pytest.raises(InputError, match="offload_mode accelerate"):
        LoadSpec(str(tmp_path), offload="accelerate", devices="cpu,cpu")


# -- split ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("n,gib", [(1, 24), (1, 96), (2, 24), (2, 48), (2, 80), (2, 96), (4, 24), (4, 48), (4, 80)])
def test_split_of_the_real_model(quant: str, n: int, gib: float) -> None:
    sizes, other = list(SIZES.block_bytes[quant]), SIZES.other_bytes[quant]
    names, rooms = cards(n, gib)
    plan = dv.plan_split(sizes, other, names, rooms, HEADROOM)
    check_invariants(plan, sizes, other, rooms)
    room_for_blocks = sum(rooms) - n * HEADROOM - other
    if sum(sizes) <= room_for_blocks - n * max(sizes):  # block granularity: a run may leave < 1 block unused
        assert plan.streamed == [], plan.describe()
    if plan.streamed:  # the GPUs together are short: they are filled, one streams the rest
        assert plan.streamed_bytes >= sum(sizes) - room_for_blocks
    if n == 1:  # one device: the single-GPU planner's answer
        assert plan.streamed == plan_placement(sizes, other, rooms[0], HEADROOM).streamed


def test_bf16_on_two_96_gb_cards_streams_nothing_and_balances() -> None:
    sizes, other = list(SIZES.block_bytes["bf16"]), SIZES.other_bytes["bf16"]
    names, rooms = cards(2, 96)
    plan = dv.plan_split(sizes, other, names, rooms, HEADROOM)
    assert plan.streamed == [] and plan.describe().endswith("nothing streams")
    free = [r - b for r, b in zip(rooms, plan.gpu_bytes_by_device)]
    assert abs(free[0] - free[1]) <= 1.01 * max(sizes)  # proportional runs: the same room left, to a block
    assert plan.block_devices[0] == "cuda:0" and plan.block_devices[-1] == "cuda:1"
    assert dv.plan_split(sizes, other, names, rooms, HEADROOM, allow_streaming=False) == plan


def test_bf16_on_two_48_gb_cards_streams_the_rest_from_one() -> None:
    sizes, other = list(SIZES.block_bytes["bf16"]), SIZES.other_bytes["bf16"]
    names, rooms = cards(2, 48)
    plan = dv.plan_split(sizes, other, names, rooms, HEADROOM)
    single = plan_placement(sizes, other, rooms[0], HEADROOM)
    assert 0 < len(plan.streamed) < len(single.streamed)  # the second card takes blocks off the stream
    with pytest.raises(InsufficientVRAMError, match="do not fit 2 device"):
        dv.plan_split(sizes, other, names, rooms, HEADROOM, allow_streaming=False)


def test_unequal_cards_and_per_device_headroom() -> None:
    sizes, other = list(SIZES.block_bytes["int8"]), SIZES.other_bytes["int8"]
    names, rooms = ["cuda:0", "cuda:1"], [int(24 * GIB), int(80 * GIB)]
    plan = dv.plan_split(sizes, other, names, rooms, [HEADROOM, 4 * HEADROOM])
    check_invariants(plan, sizes, other, rooms)
    assert plan.streamed == []
    assert plan.ranges[1][1] - plan.ranges[1][0] > plan.ranges[0][1] - plan.ranges[0][0]  # the big card takes more
    assert plan.plans[1].headroom_bytes == 4 * HEADROOM


def test_first_card_too_small_for_the_non_block_parts() -> None:
    with pytest.raises(InsufficientVRAMError, match="non-block parts"):
        dv.plan_split([GIB] * 4, 10 * GIB, ["cuda:0", "cuda:1"], [8 * GIB, 80 * GIB], GIB)


def _brute_force_streamed(sizes, other, rooms, headroom, slots=2) -> int | None:
    """The fewest streamed bytes over every 2-device cut and streaming device (reference)."""
    best = None
    for cut in range(len(sizes) + 1):
        runs = [sizes[:cut], sizes[cut:]]
        others = [other, 0]
        for s in range(2):
            ok, streamed = True, 0
            for d in range(2):
                if d == s:
                    try:
                        streamed = plan_placement(runs[d], others[d], rooms[d], headroom, prefetch_slots=slots).streamed_bytes
                    except InsufficientVRAMError:
                        ok = False
                elif sum(runs[d]) + others[d] + headroom > rooms[d]:
                    ok = False
            if ok and (best is None or streamed < best):
                best = streamed
    return best


def test_split_streams_no_more_than_the_best_cut_random() -> None:
    rng = random.Random(13)
    for _ in range(150):
        n = rng.randint(1, 9)
        sizes = [rng.randint(4, 6) * GIB for _ in range(n)]
        other, head = rng.randint(0, 3) * GIB, rng.randint(0, 2) * GIB
        rooms = [rng.randint(8, 40) * GIB for _ in range(2)]
        ref = _brute_force_streamed(sizes, other, rooms, head)
        try:
            plan = dv.plan_split(sizes, other, ["cuda:0", "cuda:1"], rooms, head)
        except InsufficientVRAMError:
            assert ref is None, (sizes, other, head, rooms)
            continue
        check_invariants(plan, sizes, other, rooms)
        assert ref is not None and plan.streamed_bytes <= ref, (sizes, other, head, rooms, plan.describe())


def test_block_of_each_device() -> None:
    plan = dv.plan_split([GIB] * 6, 0, ["cuda:0", "cuda:1", "cuda:2"], [3 * GIB] * 3, 0)
    assert [plan.device_index(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert plan.placements == (Placement.GPU,) * 6
    with pytest.raises(IndexError):
        plan.device_index(6)


# -- CFG-parallel and the choice ------------------------------------------------------------------------
def test_cfg_parallel_plans() -> None:
    # NF4's 44.7 GiB of weights beside the 1 MP headroom (~3 GiB a row, its KV cache included): resident on two
    # 64 GB cards, not on two 40 GB ones
    for quant, gib, resident in (("int8", 96, True), ("nf4", 80, True), ("nf4", 64, True), ("nf4", 40, False),
                                 ("bf16", 96, False), ("int8", 80, False)):
        sizes, other = list(SIZES.block_bytes[quant]), SIZES.other_bytes[quant]
        rooms = cards(2, gib)[1]
        plan = dv.plan_cfg_parallel(sizes, other, rooms, HEADROOM, allow_streaming=False)
        assert (plan is not None) == resident, (quant, gib)
    sizes, other = list(SIZES.block_bytes["bf16"]), SIZES.other_bytes["bf16"]
    streaming = dv.plan_cfg_parallel(sizes, other, cards(2, 141)[1], HEADROOM)  # 2x H200: each streams the same blocks
    assert streaming is not None and 0 < len(streaming.streamed) < 32
    assert dv.plan_cfg_parallel(sizes, other, [int(141 * GIB), int(8 * GIB)], HEADROOM) is None


def test_replicas_carry_only_the_decoders_own_parts() -> None:
    sizes = [10 * GIB] * 4
    rooms = [50 * GIB, 45 * GIB]  # the second card cannot hold the 8 GiB of VAE / vision parts, only the decoder
    assert dv.plan_cfg_parallel(sizes, 8 * GIB, rooms, GIB, allow_streaming=False) is None
    plan = dv.plan_cfg_parallel(sizes, 8 * GIB, rooms, GIB, replica_other_bytes=GIB, allow_streaming=False)
    assert plan is not None and plan.streamed == []


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(cfg_batch=True, single_fits_resident=True, cfg_fits_resident=True, cfg_fits=True), "cfg_parallel"),
        (dict(cfg_batch=False, single_fits_resident=True, cfg_fits_resident=True, cfg_fits=True), "off"),
        (dict(cfg_batch=True, single_fits_resident=False, cfg_fits_resident=False, cfg_fits=True), "split"),
        (dict(cfg_batch=False, single_fits_resident=False, cfg_fits_resident=False, cfg_fits=False), "split"),
    ],
)
def test_auto_mode(kw, expected) -> None:
    assert dv.choose_mode("auto", 2, **kw).mode == expected
    assert dv.choose_mode("auto", 1, **kw).mode == "off"
    assert dv.choose_mode("off", 4, **kw).mode == "off"
    assert dv.choose_mode("split", 2, **kw).mode == "split"


def test_cfg_parallel_refusals() -> None:
    with pytest.raises(ValueError, match="CFG-distilled"):
        dv.choose_mode("cfg_parallel", 2, cfg_batch=False, single_fits_resident=True, cfg_fits_resident=True,
                       cfg_fits=True)
    with pytest.raises(ValueError, match="replica"):
        dv.choose_mode("cfg_parallel", 2, cfg_batch=True, single_fits_resident=False, cfg_fits_resident=False,
                       cfg_fits=False)


def _spec(tmp_path, **kw) -> LoadSpec:
    return LoadSpec(str(tmp_path), **kw)


@pytest.mark.parametrize(
    "quant,offload,n,gib,mode,streams",
    [
        ("bf16", "smart", 2, 96, "split", False),  # BF16 on 2x 96 GB: no CPU offload at all
        ("bf16", "disabled", 2, 96, "split", False),
        ("bf16", "smart", 2, 48, "split", True),
        ("bf16", "smart", 4, 80, "split", False),
        ("bf16", "smart", 2, 141, "split", False),  # 2x H200: splits rather than stream a replica each
        ("int8", "smart", 2, 96, "cfg_parallel", False),
        ("int8", "disabled", 4, 48, "split", False),
        ("nf4", "disabled", 2, 80, "cfg_parallel", False),
    ],
)
def test_auto_on_fake_cards(tmp_path, quant, offload, n, gib, mode, streams) -> None:
    spec = _spec(tmp_path, quant=quant, offload=offload)
    names, rooms = cards(n, gib)
    mp = multi_gpu.plan_devices(spec, SIZES.block_bytes[quant], SIZES.other_bytes[quant], SIZES.config,
                                devices=[torch.device(d) for d in names], rooms=rooms,
                                replica_other_bytes=int(1.2 * GIB))
    assert mp.mode == mode, mp.describe()
    plan = mp.split if mode == "split" else mp.cfg_plan
    assert bool(plan.streamed) == streams, mp.describe()
    assert len(mp.devices) == n


def test_plan_devices_errors_name_the_choices(tmp_path) -> None:
    sizes, other = SIZES.block_bytes["bf16"], SIZES.other_bytes["bf16"]
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(NotEnoughVRAMError, match="offload_mode smart"):
        multi_gpu.plan_devices(_spec(tmp_path, offload="disabled"), sizes, other, SIZES.config, devices=devices,
                               rooms=cards(2, 48)[1])
    with pytest.raises(InputError, match="cfg_parallel cannot run.*bitsandbytes"):
        multi_gpu.plan_devices(_spec(tmp_path, quant="nf4", multi_gpu="cfg_parallel"), SIZES.block_bytes["nf4"],
                               SIZES.other_bytes["nf4"], SIZES.config, devices=devices, rooms=cards(2, 96)[1],
                               replicable=False)
    distil = dict(SIZES.config or {}, cfg_distilled=True)
    with pytest.raises(InputError, match="CFG-distilled"):
        multi_gpu.plan_devices(_spec(tmp_path, quant="int8", multi_gpu="cfg_parallel"), SIZES.block_bytes["int8"],
                               SIZES.other_bytes["int8"], _Cfg(distil), devices=devices, rooms=cards(2, 96)[1])
    mp = multi_gpu.plan_devices(_spec(tmp_path, quant="int8", multi_gpu="off"), SIZES.block_bytes["int8"],
                                SIZES.other_bytes["int8"], SIZES.config, devices=devices, rooms=cards(2, 96)[1])
    assert mp.mode == "split" and mp.devices == (devices[0],) and "first device only" in mp.describe()


class _Cfg:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


def test_budget_is_per_gpu(tmp_path) -> None:
    spec = _spec(tmp_path, offload="budget", vram_budget_gb=40)
    assert multi_gpu.device_room(spec, torch.device("cuda", 1)) == 40 * GIB
    assert multi_gpu.device_room(spec, torch.device("cpu")) == multi_gpu.CPU_ROOM


def test_combinations_cover_every_quant_and_card_count() -> None:
    # every quant x 1/2/4 cards of 24/48/80/96 GB either plans or says why (never another exception)
    for quant, n, gib in itertools.product(cp.QUANT_ORDER, (1, 2, 4), (24, 48, 80, 96)):
        names, rooms = cards(n, gib)
        try:
            plan = dv.plan_split(SIZES.block_bytes[quant], SIZES.other_bytes[quant], names, rooms, HEADROOM)
        except InsufficientVRAMError as exc:
            assert "GiB" in str(exc)
            continue
        check_invariants(plan, SIZES.block_bytes[quant], SIZES.other_bytes[quant], rooms)
