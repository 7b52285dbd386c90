"""ResidencyManager on CPU: streaming mechanics (synchronous), park/restore, RAM check, loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from residency_models import inputs, make_model

from hunyuan_image3.memory.residency import (
    InsufficientRAMError,
    Placement,
    ResidencyManager,
    ResidencyPlan,
    ResidencyState,
    StreamingUnavailableError,
    place_loaded_model,
    weight_tensors,
)

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
MODES = ["bf16", "int8", "nf4"]


def _run(model, x, times=1):
    with torch.no_grad():
        return [model(x) for _ in range(times)]


def _stream_plan(mgr, k):
    s = set(range(len(mgr.blocks))[-k:]) if k else set()
    return ResidencyPlan(
        tuple(Placement.STREAM if i in s else Placement.GPU for i in range(len(mgr.blocks))),
        tuple(mgr.block_bytes), mgr.other_bytes,
    )


@pytest.mark.parametrize("mode", MODES)
def test_cpu_streaming_is_bit_identical(mode):
    model = make_model(mode, n=5)
    x = inputs()
    (ref,) = _run(model, x)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    assert mgr.state is ResidencyState.RESIDENT
    plan = mgr.plan_for_budget(mgr.other_bytes + 4 * mgr.block_bytes[0], 0)
    assert len(plan.streamed) == 3
    mgr.apply(plan)
    assert mgr.state is ResidencyState.STREAMING
    outs = _run(model, x, times=3)
    assert all(torch.equal(o, ref) for o in outs)
    st = mgr.streamer
    assert len(st.slots) == 2 and st.copies == 3 * 3 + 1  # prefetch continues across steps
    # between forwards the streamed blocks point at their single pinned/flat master copy
    for i in plan.streamed:
        pb = mgr._packed[i]
        for w in weight_tensors(model.model.layers[i]):
            assert pb.host.tensor.data_ptr() <= w.tensor.data_ptr() < pb.host.tensor.data_ptr() + pb.nbytes
    mgr.apply(ResidencyPlan.uniform(Placement.GPU, mgr.block_bytes, mgr.other_bytes))
    assert mgr.state is ResidencyState.RESIDENT and not model.model.layers[4]._forward_pre_hooks
    assert torch.equal(_run(model, x)[0], ref)


def test_streamer_recovers_after_exception():
    model = make_model("bf16", n=4)
    x = inputs()
    (ref,) = _run(model, x)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    mgr.apply(_stream_plan(mgr, 3))
    blk = model.model.layers[4 - 2]
    original = blk.mlp.forward

    def boom(*a, **k):
        raise RuntimeError("simulated OOM")

    blk.mlp.forward = boom
    with pytest.raises(RuntimeError, match="simulated"):
        _run(model, x)
    blk.mlp.forward = original
    assert mgr.streamer.active is None
    assert torch.equal(_run(model, x)[0], ref)


@pytest.mark.parametrize("mode", MODES)
def test_adopt_is_construct_adopt_packed_apply_with_one_walk(mode, monkeypatch):
    """ResidencyManager.adopt (block-order loads): blocks a loader packed itself, the rest where it
    is; the same manager as the three calls, from one walk over the weights, none kept after."""
    from hunyuan_image3.memory.residency import manager as manager_mod
    from hunyuan_image3.memory.residency.packed import PackedBlock

    model = make_model(mode, n=4)
    x = inputs()
    (ref,) = _run(model, x)
    packed = {i: PackedBlock(weight_tensors(model.model.layers[i]), pin=False) for i in (2, 3)}
    walks = []
    real_walk = manager_mod.weight_tensors
    monkeypatch.setattr(manager_mod, "weight_tensors", lambda m, **kw: walks.append(m) or real_walk(m, **kw))
    mgr = ResidencyManager.adopt(model, model.model.layers, "cpu", packed, lambda m: _stream_plan(m, 2),
                                 allow_cpu_streaming=True)
    assert len(walks) == 5  # each block and the rest, once
    assert mgr._walk is None and mgr.state is ResidencyState.STREAMING
    assert mgr.plan.streamed == [2, 3] and all(mgr._packed[i] is packed[i] for i in (2, 3))
    assert torch.equal(_run(model, x)[0], ref)
    monkeypatch.setattr(manager_mod, "weight_tensors", real_walk)
    again = make_model(mode, n=4)
    packed = {i: PackedBlock(weight_tensors(again.model.layers[i]), pin=False) for i in (2, 3)}
    three = ResidencyManager(again, again.model.layers, "cpu", allow_cpu_streaming=True)
    three.adopt_packed(packed)
    three.apply(_stream_plan(three, 2))
    assert (three.block_bytes, three.other_bytes, three.plan) == (mgr.block_bytes, mgr.other_bytes, mgr.plan)


def test_streaming_without_cuda_is_refused_clearly():
    model = make_model("bf16", n=4)
    mgr = ResidencyManager(model, model.model.layers, "cpu")
    with pytest.raises(StreamingUnavailableError, match="needs a CUDA GPU"):
        mgr.apply(_stream_plan(mgr, 3))
    assert mgr.state is ResidencyState.RESIDENT
    plan = mgr.plan_for_budget(10**12, 0)  # planning still works
    assert plan.streamed == []
    mgr.apply(plan)


@pytest.mark.parametrize("mode", MODES)
def test_park_restore_round_trip_bit_exact(mode):
    model = make_model(mode, n=4)
    x = inputs()
    (ref,) = _run(model, x)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    mgr.apply(_stream_plan(mgr, 3))
    report = mgr.park(available_ram_bytes=10**12)
    assert mgr.state is ResidencyState.PARKED and mgr.gpu_bytes() == 0
    assert report.moved_bytes == mgr.block_bytes[0] + mgr.other_bytes
    assert not any(b._forward_pre_hooks for b in model.model.layers)
    mgr.restore()
    assert mgr.state is ResidencyState.STREAMING
    assert torch.equal(_run(model, x)[0], ref)


def test_park_refuses_without_ram_and_leaves_model_untouched():
    model = make_model("int8", n=3)
    x = inputs()
    (ref,) = _run(model, x)
    mgr = ResidencyManager(model, model.model.layers, "cpu")
    ptrs = [w.tensor.data_ptr() for w in weight_tensors(model)]
    with pytest.raises(InsufficientRAMError, match="Nothing was moved") as err:
        mgr.park(available_ram_bytes=1000)
    assert "GiB of CPU RAM" in str(err.value)
    assert mgr.state is ResidencyState.RESIDENT
    assert ptrs == [w.tensor.data_ptr() for w in weight_tensors(model)]
    assert torch.equal(_run(model, x)[0], ref)


def test_stream_extra_streams_more_then_restores():
    model = make_model("bf16", n=6)
    x = inputs()
    (ref,) = _run(model, x)
    mgr = ResidencyManager(model, model.model.layers, "cpu", allow_cpu_streaming=True)
    b = mgr.block_bytes[0]
    base = mgr.plan_for_budget(mgr.other_bytes + 6 * b, 0)
    mgr.apply(base)
    assert base.streamed == []
    with mgr.stream_extra(2 * b) as extra:
        assert len(extra.streamed) == 4 and mgr.state is ResidencyState.STREAMING
        assert extra.gpu_bytes <= mgr.other_bytes + 6 * b
        assert torch.equal(_run(model, x)[0], ref)
    assert mgr.plan == base and mgr.state is ResidencyState.RESIDENT
    assert torch.equal(_run(model, x)[0], ref)


def test_place_loaded_model_from_mmap_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("bf16", n=4)
    x = inputs()
    (ref,) = _run(model, x)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = make_model("bf16", n=4, seed=5)
    sd = load_file(tmp_path / "m.safetensors")  # mmap'd
    fresh.load_state_dict(sd, assign=True)
    del sd
    mmap_ptrs = {w.tensor.data_ptr() for w in weight_tensors(fresh.model.layers[3])}
    b = ResidencyManager(fresh, fresh.model.layers, "cpu").block_bytes[0]
    budget = sum(w.tensor.nbytes for w in weight_tensors(fresh)) - 4 * b + b * 3
    with pytest.raises(InsufficientRAMError):
        place_loaded_model(fresh, fresh.model.layers, "cpu", budget_bytes=budget,
                           available_ram_bytes=1000, allow_cpu_streaming=True)
    assert {w.tensor.data_ptr() for w in weight_tensors(fresh.model.layers[3])} == mmap_ptrs
    mgr = place_loaded_model(fresh, fresh.model.layers, "cpu", budget_bytes=budget, allow_cpu_streaming=True)
    assert mgr.state is ResidencyState.STREAMING and 3 in mgr.plan.streamed
    assert not mmap_ptrs & {w.tensor.data_ptr() for w in weight_tensors(fresh.model.layers[3])}
    assert torch.equal(_run(fresh, x)[0], ref)
