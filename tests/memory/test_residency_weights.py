"""Weight enumeration, bytes accounting and packing of bf16 / bnb int8 / nf4 layers (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures_model import portable_nf4_on_cpu
from residency_models import inputs, make_model
from torch import nn

from hunyuan_image3.memory.residency import (
    PackedBlock,
    module_weight_bytes,
    move_module_weights,
    weight_tensors,
)

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _int8(out=32, inp=64):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(inp, out)
    q = bnb.nn.Linear8bitLt(inp, out, has_fp16_weights=False, threshold=6.0)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu").eval()


def _nf4(out=64, inp=64):  # bnb 4-bit CPU kernels work in 64-wide blocks, like the real shapes
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(inp, out)
    q = bnb.nn.Linear4bit(inp, out, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    return portable_nf4_on_cpu(q.to("cpu").eval())


def test_plain_module_bytes_and_refs():
    m = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    ws = weight_tensors(m)
    expected = sum(p.numel() * p.element_size() for p in m.parameters())
    expected += sum(b.numel() * b.element_size() for b in m.buffers())
    assert module_weight_bytes(m) == expected
    assert len(ws) == len(list(m.parameters())) + len(list(m.buffers()))


def test_int8_state_enumerated_and_aliased():
    q = _int8()
    ws = weight_tensors(q)
    # after normalisation the int8 matrix lives in state.CB, aliased by weight.data
    assert q.weight.CB is None and q.state.CB is not None
    assert q.state.CB.data_ptr() == q.weight.data_ptr()
    kinds = {(type(r.owner).__name__, r.name) for w in ws for r in w.refs}
    assert ("MatmulLtState", "CB") in kinds and ("MatmulLtState", "SCB") in kinds
    assert module_weight_bytes(q) == 32 * 64 + 32 * 4 + 32 * 4  # int8 CB + fp32 SCB + fp32 bias
    with torch.no_grad():
        q(torch.randn(3, 64))
    assert q.state.idx is not None
    weight_tensors(q)
    assert q.state.idx is None  # transient outlier columns are dropped


def test_nf4_quant_state_enumerated_shared_once():
    q = _nf4()
    qs = q.weight.quant_state
    assert q.quant_state is qs and qs.nested
    names = {r.name for w in weight_tensors(q) for r in w.refs}
    assert {"absmax", "code", "offset", "weight", "bias"} <= names
    tensors = [w.tensor for w in weight_tensors(q)]
    assert any(t is qs.state2.absmax for t in tensors) and any(t is qs.state2.code for t in tensors)
    # a second Params4bit sharing the quant_state is counted once
    twin = nn.Module()
    twin.a, twin.b = q, _nf4()
    twin.b.weight.quant_state = qs
    twin.b.quant_state = qs
    n_qs = sum(1 for w in weight_tensors(twin) for r in w.refs if r.owner is qs)
    assert n_qs == 3  # absmax, code, offset once


@pytest.mark.parametrize("mode", ["bf16", "int8", "nf4"])
def test_pack_unpack_round_trip_bit_exact(mode):
    model = make_model(mode, n=2)
    x = inputs()
    with torch.no_grad():
        ref = model(x)
    blk = model.model.layers[1]
    before = {k: v.clone() for k, v in blk.state_dict().items() if isinstance(v, torch.Tensor)}
    pb = PackedBlock(weight_tensors(blk), pin=False)
    assert pb.nbytes % 256 == 0 and pb.nbytes >= module_weight_bytes(blk)
    for w, off in zip(pb.tensors, pb.layout.offsets):  # every tensor is a view of the flat buffer
        assert w.tensor.data_ptr() == pb.host.tensor.data_ptr() + off
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    pb.unpack_to("cpu")
    after = {k: v for k, v in blk.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_move_to_same_device_is_noop_and_counts_bytes():
    model = make_model("int8", n=1)
    ptrs = [w.tensor.data_ptr() for w in weight_tensors(model)]
    assert move_module_weights(model, "cpu") == 0
    assert ptrs == [w.tensor.data_ptr() for w in weight_tensors(model)]


def test_packing_rehomes_every_bnb_tensor():
    for mode in ("int8", "nf4"):
        model = make_model(mode, n=1)
        blk = model.model.layers[0]
        pb = PackedBlock(weight_tensors(blk), pin=False)
        base, end = pb.host.tensor.data_ptr(), pb.host.tensor.data_ptr() + pb.nbytes

        def inside(t, base=base, end=end):
            return base <= t.data_ptr() < end

        for m in blk.modules():
            if type(m).__name__ == "Linear8bitLt":
                assert inside(m.state.CB) and inside(m.state.SCB) and inside(m.weight)
            if type(m).__name__ == "Linear4bit":
                qs = m.weight.quant_state
                assert qs is m.quant_state
                assert all(inside(t) for t in (m.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))
