"""Expert-granular block streaming on CUDA (@gpu): the copy stream, its events and the slots' partial
contents give the resident bits for one-token forwards, prompts and both in turn, in every format."""

from __future__ import annotations

import warnings

import pytest
import torch
from residency_models import make_model
from torch import nn

from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_w8a16
from hunyuan_image3.hunyuan_loader.hooks.moe_dispatch import install_moe_dispatch
from hunyuan_image3.hunyuan_loader.hooks.streaming import connect_streaming
from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
pytestmark = pytest.mark.gpu
DEV = torch.device("cuda", 0) if torch.cuda.is_available() else None
E, K = 16, 2


def _model(fmt: str) -> nn.Module:
    model = make_model("bf16" if fmt == "w8a16" else fmt, n=6, e=E, h=256, w=512)
    if fmt == "w8a16":
        quantize_w8a16(model)
    for layer in model.model.layers:
        layer.mlp.moe_topk = K
        for ex in layer.mlp.experts:
            ex.hidden_act, ex.act_fn = "silu", nn.SiLU()
    install_moe_dispatch(model)
    return model


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids.to(DEV))
    torch.cuda.synchronize()
    return out.cpu()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4", "w8a16"])
def test_expert_streaming_on_cuda_is_bit_identical_and_copies_less(fmt) -> None:
    model = _model(fmt)
    mgr = ResidencyManager(model, model.model.layers, DEV)
    connect_streaming(model, [mgr])
    n = len(mgr.blocks)
    mgr.apply(ResidencyPlan.uniform(Placement.GPU, mgr.block_bytes, mgr.other_bytes))
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, 97, (1, 1), generator=g) for _ in range(6)]
    prompt = torch.randint(0, 97, (2, 40), generator=g)
    seq = [tokens[0], tokens[1], prompt, tokens[2], tokens[3], prompt, tokens[4], tokens[5]]
    ref = [_run(model, x) for x in seq]
    streamed = {1, 2, 4, 5}
    mgr.apply(ResidencyPlan(tuple(Placement.STREAM if i in streamed else Placement.GPU for i in range(n)),
                            tuple(mgr.block_bytes), mgr.other_bytes))
    st = mgr.streamer
    assert st._parts and st.cuda
    whole = sum(st.packed[i].nbytes for i in streamed)
    for x, want in zip(seq, ref):
        before = st.copied_bytes
        assert torch.equal(_run(model, x), want)
        if x.numel() == 1:
            assert st.copied_bytes - before < 0.5 * whole
    assert st.part_copies > 0
    mgr.close()


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4"])
def test_a_smart_offload_load_wires_expert_streaming_and_a_token_copies_less(
        cache, instruct_checkpoint, monkeypatch, quant) -> None:
    """Through the real load (smart offload, about half the blocks streamed): the streamer has each
    streamed block's expert split; a one-token decoder forward (what the official decode step runs)
    copies less than the streamed blocks and gives the resident bits."""
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec

    gib = 1024**3
    cache.force_unload()
    resident = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), quant=quant)))
    manager = resident.residency
    budget = manager.other_bytes + 2 * max(manager.block_bytes) + sum(manager.block_bytes) // 2
    cache.force_unload()
    monkeypatch.setenv("HUNYUAN_VRAM_LIMIT_GB", str((torch.cuda.memory_allocated() + budget) / gib))
    smart = cache.get(cache.load(LoadSpec(str(instruct_checkpoint), quant=quant, offload="smart", headroom_gb=1e-6)))
    manager = smart.residency
    assert manager.plan.streamed, manager.plan.describe()
    st = manager.streamer
    assert set(st._parts) == set(manager.plan.streamed)
    token = torch.tensor([[5]], device=DEV)
    with torch.no_grad():
        st.reset()
        before = st.copied_bytes
        out = smart.model.model(input_ids=token)
        torch.cuda.synchronize()
    copied = st.copied_bytes - before
    assert 0 < copied < sum(st.packed[i].nbytes for i in manager.plan.streamed)
    monkeypatch.delenv("HUNYUAN_VRAM_LIMIT_GB")
    manager.apply(ResidencyPlan.uniform(Placement.GPU, manager.block_bytes, manager.other_bytes))
    with torch.no_grad():
        again = smart.model.model(input_ids=token)
    assert torch.equal(out, again)
