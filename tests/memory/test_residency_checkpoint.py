"""The residency engine on the HunyuanImage-3-shaped test checkpoint, loaded through
transformers on the CPU in bf16 / int8 / nf4 (streaming runs synchronously on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures_model import load_test_model, portable_nf4_on_cpu

from hunyuan_image3.memory.residency import (
    ResidencyManager,
    ResidencyState,
    place_loaded_model,
    weight_tensors,
)

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("quant", [None, "int8", "nf4"])
def test_stream_park_restore_on_test_checkpoint(base_checkpoint, quant):
    model = portable_nf4_on_cpu(load_test_model(base_checkpoint, quant))
    layers = model.model.layers
    assert type(layers[0]).__name__ == "HunyuanImage3DecoderLayer"
    ref = _logits(model)
    mgr = ResidencyManager(model, layers, "cpu", allow_cpu_streaming=True)
    n = len(layers)
    b = max(mgr.block_bytes)
    plan = mgr.plan_for_budget(mgr.other_bytes + (n - 1) * b, 0)
    assert plan.streamed, plan.describe()
    mgr.apply(plan)
    assert mgr.state is ResidencyState.STREAMING
    assert torch.equal(_logits(model), ref) and torch.equal(_logits(model), ref)
    mgr.park(available_ram_bytes=10**12)
    assert mgr.state is ResidencyState.PARKED
    mgr.restore()
    assert torch.equal(_logits(model), ref)
    mgr.close()


def test_place_loaded_bf16_streams_from_mmap(base_checkpoint):
    model = load_test_model(base_checkpoint)
    ref = _logits(model)
    layers = model.model.layers
    probe = ResidencyManager(model, layers, "cpu")
    budget = probe.other_bytes + (len(layers) - 1) * max(probe.block_bytes)
    mgr = place_loaded_model(model, layers, "cpu", budget_bytes=budget, allow_cpu_streaming=True)
    assert mgr.plan.streamed
    for i in mgr.plan.streamed:
        pb = mgr._packed[i]
        lo, hi = pb.host.tensor.data_ptr(), pb.host.tensor.data_ptr() + pb.nbytes
        assert all(lo <= w.tensor.data_ptr() < hi for w in weight_tensors(layers[i]))
    assert torch.equal(_logits(model), ref)
