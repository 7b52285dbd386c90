"""Grouped W8A16 MoE kernel (hunyuan_loader/kernels/w8a16_grouped.py) and the dispatch's choice between it
and the per-expert loop (hunyuan_loader/hooks/moe_dispatch.py). The kernel's logic runs in Triton's CPU
interpreter (a subprocess, fp16: the interpreter has no bf16 dot); GPU tests are marked."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn
from triton_interpreter import PRELUDE, interpret, needs_triton

from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_experts_w8a16
from hunyuan_image3.hunyuan_loader.hooks import moe_dispatch as md
from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg
from hunyuan_image3.hunyuan_loader.test_model import load_remote_code, wrap_moe_block

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL = Path("/tmp/official/base/hunyuan_image_3/hunyuan.py")


def _block(dtype=torch.bfloat16, topk: int = 2, experts: int = 8, seed: int = 0, device: str = "cpu",
           hidden: int = 64, width: int = 64):
    modeling = load_remote_code("base")
    config = modeling.HunyuanImage3Config(moe_topk=[topk], num_experts=experts, hidden_size=hidden,
                                          moe_intermediate_size=width)
    torch.manual_seed(seed)
    block = modeling.HunyuanMoE(config, 0)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    block.to(dtype)
    block.gate.wg.float()
    block.gate.wg.weight.data[3] = -50.0  # on positive inputs expert 3 is never chosen: 0 tokens
    model = wrap_moe_block(block, config)
    assert quantize_experts_w8a16(model) == 2 * experts
    block.to(device)
    md.install_moe_dispatch(model, "gather_scatter")
    return model, block


# -- eligibility (no Triton needed) ------------------------------------------------------------
def test_grouped_eligibility_rules(monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.formats import w8a16

    _, block = _block()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    experts = block.experts
    assert "not available" in mg.grouped_w8a16_reason(experts, x)  # CPU: the fused kernel does not run
    monkeypatch.setattr(w8a16, "fused_available", lambda x: True)
    assert mg.grouped_w8a16_reason(experts, x) is None
    monkeypatch.setenv(mg.GROUPED_ENV, "0")
    assert mg.GROUPED_ENV in mg.grouped_w8a16_reason(experts, x)
    monkeypatch.delenv(mg.GROUPED_ENV)
    handle = experts[5].down_proj.register_forward_hook(lambda *a: None)
    assert "hooks" in mg.grouped_w8a16_reason(experts, x)
    handle.remove()
    handle = experts[0].register_forward_pre_hook(lambda *a: None)
    assert "hooks" in mg.grouped_w8a16_reason(experts, x)
    handle.remove()
    assert mg.grouped_w8a16_reason(experts, x) is None
    # the official expert (hunyuan.py:989, :1003; modeling_hunyuan_image_3.py:1052, :1066) has
    # hidden_act = config.hidden_act and act_fn = ACT2FN[hidden_act] (transformers' SiLUActivation)
    assert experts[2].hidden_act == "silu" and type(experts[2].act_fn).__name__ == "SiLUActivation"
    experts[2].hidden_act = "gelu"
    assert "SiLU" in mg.grouped_w8a16_reason(experts, x)
    del experts[2].hidden_act  # read from the class as well (bench/_synthetic's MLP declares it there)
    type(experts[2]).hidden_act = "silu"
    try:
        assert mg.grouped_w8a16_reason(experts, x) is None
    finally:
        del type(experts[2]).hidden_act
    experts[2].hidden_act = "silu"
    act = experts[2].act_fn
    experts[2].act_fn = nn.GELU()
    assert "SiLU" in mg.grouped_w8a16_reason(experts, x)
    del experts[2].act_fn  # no act_fn: not the official module, not grouped
    assert "SiLU" in mg.grouped_w8a16_reason(experts, x)
    experts[2].act_fn = act
    saved = experts[1].gate_and_up_proj
    experts[1].gate_and_up_proj = nn.Linear(64, 128, bias=False).to(torch.bfloat16)  # a skipped (bf16) expert
    assert "Int8WeightOnlyLinear" in mg.grouped_w8a16_reason(experts, x)
    experts[1].gate_and_up_proj = saved
    saved.bias = nn.Parameter(torch.zeros(128, dtype=torch.bfloat16), requires_grad=False)
    assert "Int8WeightOnlyLinear" in mg.grouped_w8a16_reason(experts, x)
    saved.bias = None
    assert mg.grouped_w8a16_reason(experts, x) is None


def test_expert_chunks_bound_the_rows(monkeypatch) -> None:
    monkeypatch.setattr(mg, "GROUPED_ROWS", 100)
    assert mg._expert_chunks([30, 0, 60, 20, 150, 0, 99, 2]) == [(0, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    assert mg._expert_chunks([0, 0]) == [(0, 2)]
    assert mg._expert_chunks([]) == [(0, 0)]


def test_official_expert_mlp_is_what_the_grouped_path_computes() -> None:
    """The grouped path hard-codes ``x1 * silu(x2)`` of ``chunk(2, dim=2)``: pinned to the official lines."""
    assert "hunyuan.py:1014-1019" in mg.grouped_w8a16_reason.__doc__
    if not OFFICIAL.exists():
        pytest.skip("the official code is not on this machine")
    lines = OFFICIAL.read_text(encoding="utf-8").splitlines()[1013:1019]
    assert lines[0].strip() == "def forward(self, x):"
    assert lines[1].strip() == 'if self.hidden_act == "silu":'
    assert lines[3].strip() == "x1, x2 = gate_and_up_proj.chunk(2, dim=2)"
    assert lines[4].strip() == "down_proj = self.down_proj(x1 * self.act_fn(x2))"


# -- the kernel in the Triton interpreter ----------------------------------------------------------
_PRELUDE = PRELUDE + r"""
import os, contextlib
from hunyuan_image3.hunyuan_loader.kernels import w8a16_grouped as G
from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight, torch_w8a16
torch.manual_seed(0)
def experts(counts, n, kk):
    ws, ss = zip(*[quantize_weight(torch.randn(n, kk) * 0.05) for _ in counts])
    return list(ws), list(ss)
def check(x, ws, ss, counts, cfg, tol=2e-3):
    y = G.grouped_linear(x, ws, ss, counts, config=cfg)
    assert y.shape == (sum(counts), ws[0].shape[0]) and y.dtype == x.dtype
    s = 0
    worst = 0.0
    for e, c in enumerate(counts):
        ref = torch_w8a16(x[s:s + c].double(), ws[e], ss[e].double())
        if c:
            worst = max(worst, float((y[s:s + c].double() - ref).abs().max() / ref.abs().max()))
        s += c
    assert worst < tol, (str(cfg), worst)
    assert torch.equal(G.grouped_linear(x, ws, ss, counts, config=cfg), y)
    return worst
"""

# Uneven counts, an expert with 0 rows (also the first and the last), counts not multiples of
# BLOCK_M, a partial channel tile, K not a multiple of BLOCK_K; weights allocated out of order
# (the base pointer is the lowest address, not expert 0's).
_KERNEL_SMALL = _PRELUDE + r"""
counts = [0, 5, 0, 33, 16, 1, 40, 0]
ws, ss = experts(counts, 48, 96)
ws = ws[::-1]; ss = ss[::-1]
x = torch.randn(sum(counts), 96).half()
for cfg in (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2)):
    print("SMALL", cfg, check(x, ws, ss, counts, cfg))
assert G.tile_schedule(counts, 16) == ([1, 3, 3, 3, 4, 5, 6, 6, 6], [0, 5, 21, 37, 38, 54, 55, 71, 87],
                                       [5, 21, 37, 38, 54, 55, 71, 87, 95])
y0 = G.grouped_linear(torch.empty(0, 96).half(), ws, ss, [0] * len(counts), config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32))
assert y0.shape == (0, 48)
print("KERNEL OK")
"""

# Every real (non-SWAP) config: 1056 rows over experts of 0..400 rows, BLOCK_N 256 with a partial
# channel tile (384), K 192 (BLOCK_K 128 does not divide it).
_KERNEL_EVERY_CONFIG = _PRELUDE + r"""
counts = [400, 0, 129, 1, 255, 271]
ws, ss = experts(counts, 384, 192)
x = torch.randn(sum(counts), 192).half()
for cfg in G.configs():
    assert not cfg.SWAP
    print("CONFIG OK", cfg, check(x, ws, ss, counts, cfg), flush=True)
print("KERNEL OK")
"""

# The dispatch: grouped (two launches per chunk) vs the per-expert loop on the same block, within
# fp16 rounding; the tuner picks a config; HY3_MOE_GROUPED=0 turns it off; chunks of rows.
_DISPATCH = _PRELUDE + r"""
sys.path.insert(0, {tests!r})
sys.path.insert(0, {tests!r} + "/kernels")
from test_w8a16_grouped import _block
from hunyuan_image3.hunyuan_loader.hooks import moe_dispatch as md
from hunyuan_image3.hunyuan_loader.formats import w8a16
from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg
from hunyuan_image3.hunyuan_loader.core import settings
from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel
w8a16._kernel = w8a16_kernel  # the per-expert path runs the per-Linear kernel, interpreted too
w8a16.fused_available = lambda x: True  # CPU tensors stand in for CUDA ones
torch.cuda.device = lambda device: contextlib.nullcontext()
calls = []
real = G.grouped_linear
def counting(*a, **k):
    calls.append(a[3])
    return real(*a, **k)
G.grouped_linear = counting
model, block = _block(torch.float16, topk=2)
x = (torch.rand(2, 37, 64) + 0.05).half()  # positive: expert 3 (weights -50) gets no token
with torch.no_grad():
    ours = block(x)
    assert len(calls) == 2 and sum(calls[0]) == 2 * 74 and calls[0][3] == 0, calls
    assert torch.equal(block(x), ours)
    os.environ[mg.GROUPED_ENV] = "0"
    settings.refresh()  # settings are parsed once: re-read the changed variable
    n = len(calls)
    per_expert = block(x)
    assert len(calls) == n
    del os.environ[mg.GROUPED_ENV]
    settings.refresh()
    err = float((ours.double() - per_expert.double()).abs().max() / per_expert.double().abs().max())
    assert err < 1e-2, err
    mg.GROUPED_ROWS = 40
    n = len(calls)
    chunked = block(x)
    assert len(calls) - n == 2 * len(mg._expert_chunks(calls[0])) > 2, (len(calls) - n)
    assert float((chunked.double() - per_expert.double()).abs().max() / per_expert.double().abs().max()) < 1e-2
assert G.tunings(), "the grouped path tunes its config on first use"
print("KERNEL OK", err)
"""


@needs_triton
def test_tile_schedule() -> None:
    from hunyuan_image3.hunyuan_loader.kernels.w8a16_grouped import tile_schedule

    assert tile_schedule([], 16) == ([], [], [])
    assert tile_schedule([0, 0], 16) == ([], [], [])
    assert tile_schedule([3, 0, 32, 17], 16) == ([0, 2, 2, 3, 3], [0, 3, 19, 35, 51], [3, 19, 35, 51, 52])


@needs_triton
def test_grouped_kernel_small_shapes_in_the_triton_interpreter() -> None:
    interpret(_KERNEL_SMALL)


@needs_triton
def test_grouped_kernel_every_config_in_the_triton_interpreter() -> None:
    out = interpret(_KERNEL_EVERY_CONFIG)
    from hunyuan_image3.hunyuan_loader.kernels.w8a16_grouped import configs

    assert out.count("CONFIG OK") == len(configs()) >= 4


@needs_triton
def test_dispatch_grouped_matches_per_expert_in_the_triton_interpreter() -> None:
    interpret(_DISPATCH)


# -- GPU ---------------------------------------------------------------------------------------
def _gpu_layer(experts: int = 16, hidden: int = 1024, width: int = 768, topk: int = 8):
    return _block(torch.bfloat16, topk=topk, experts=experts, device="cuda", hidden=hidden, width=width)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 1056, 8448])
def test_gpu_grouped_matches_per_expert_and_repeats(tokens: int, monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_grouped as G

    _, block = _gpu_layer()
    x = torch.randn(1, tokens, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(tokens))
    x = x.to(torch.bfloat16)
    monkeypatch.setenv(mg.GROUPED_ENV, "triton")  # this kernel's test (auto may choose a dequant engine)
    assert mg.grouped_w8a16_reason(block.experts, x.reshape(-1, 1024)) is None
    calls = []
    real = G.grouped_linear
    monkeypatch.setattr(G, "grouped_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ours = [block(x) for _ in range(3)]
        assert calls, "the grouped kernel was not used"
        monkeypatch.setenv(mg.GROUPED_ENV, "0")
        n = len(calls)
        per_expert = block(x)
        assert len(calls) == n
    assert all(torch.equal(o, ours[0]) for o in ours[1:])
    ref = per_expert.float()
    err = float((ours[0].float() - ref).abs().max() / ref.abs().max())
    assert err < 2**-6, err
    for key, t in G.tunings().items():
        assert t.config is not None and not t.config.SWAP, (key, t)


@pytest.mark.gpu
def test_gpu_grouped_real_expert_shapes_every_config() -> None:
    """64 experts of the real widths (N 6144 / 4096, K 4096 / 3072), 1 MP routing counts, each
    non-SWAP config forced: fp32 reference on every expert, two runs identical."""
    from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_grouped as G
    from hunyuan_image3.hunyuan_loader.kernels.w8a16_kernel import reference_error

    g = torch.Generator("cuda").manual_seed(0)
    counts = torch.randint(900, 1200, (64,), generator=g, device="cuda").tolist()
    counts[7] = 0
    counts[20] = 1
    for n, k in ((6144, 4096), (4096, 3072)):
        ws, ss = zip(*[quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02) for _ in counts])
        x = torch.randn(sum(counts), k, device="cuda", generator=g).to(torch.bfloat16)
        for cfg in G.configs():
            y = G.grouped_linear(x, list(ws), list(ss), counts, config=cfg)
            assert torch.equal(G.grouped_linear(x, list(ws), list(ss), counts, config=cfg), y), cfg
            s = 0
            for e, c in enumerate(counts):
                if c:
                    assert reference_error(y[s:s + c], x[s:s + c], ws[e], ss[e], None) < 2**-7, (cfg, n, e)
                s += c
        del ws, ss, x


def _rms(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class _Stack(nn.Module):
    """MoE blocks of the test model as decoder layers (``layers.N.mlp``): ``x + mlp(rms(x))``, the
    pre-norm a real decoder layer has. Without it the residual grew ~x^2 per layer (weights of std
    0.2) and reached inf/NaN by the 5th layer: NaN != NaN failed the bit-identity check, and the
    tuner rejected every config on the non-finite inputs."""

    def __init__(self, blocks: list[nn.Module], config) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Module() for _ in blocks)
        for layer, block in zip(self.layers, blocks):
            layer.mlp = block
            layer.forward = types.MethodType(lambda self, x: x + self.mlp(_rms(x)), layer)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.gpu
def test_gpu_grouped_streamed_resident_and_parked_are_bit_identical(monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_grouped as G
    from hunyuan_image3.memory.residency import ResidencyManager

    dev = torch.device("cuda", 0)
    models = [_block(torch.bfloat16, topk=8, experts=16, seed=i, hidden=256, width=512) for i in range(6)]
    model = _Stack([b for _, b in models], models[0][0].config)
    assert md.install_moe_dispatch(model, "gather_scatter") == 6
    monkeypatch.setenv(mg.GROUPED_ENV, "triton")  # this kernel's test (auto: linear at 300 rows per expert)
    calls = []
    real = G.grouped_linear
    monkeypatch.setattr(G, "grouped_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 300, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
    mgr = ResidencyManager(model, model.layers, dev)
    mgr.apply(mgr.plan_for_budget(10**12, 0))
    with torch.no_grad():
        ref = model(x).cpu()
    assert calls, "the grouped kernel was not used"
    assert bool(ref.isfinite().all())
    b = mgr.block_bytes[0]
    plan = mgr.plan_for_budget(mgr.other_bytes + 4 * b, 0)
    assert plan.streamed
    mgr.apply(plan)
    with torch.no_grad():
        assert all(torch.equal(model(x).cpu(), ref) for _ in range(2))
    mgr.park()
    mgr.restore()
    with torch.no_grad():
        assert torch.equal(model(x).cpu(), ref)
    mgr.close()
    for key, t in G.tunings().items():
        assert t.config is not None, (key, t.rejected)


def test_stack_stays_finite_and_repeats_on_cpu(monkeypatch) -> None:
    """The 6-layer stack of the GPU bit-identity test: finite outputs (the cause of its failure),
    identical over two runs, through the dequant engine forced on the CPU (the grouped path's
    chunking and row bookkeeping); one block within bf16 rounding of the per-expert path (over 6
    layers near-tied routing amplifies rounding differences, so only one is compared)."""
    models = [_block(torch.bfloat16, topk=8, experts=16, seed=i, hidden=256, width=512) for i in range(6)]
    model = _Stack([b for _, b in models], models[0][0].config)
    x = torch.randn(2, 300, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    block = models[0][1]
    with torch.no_grad():
        per_expert, one = model(x), block(_rms(x))
        monkeypatch.setenv(mg.GROUPED_ENV, "linear")
        grouped, one_grouped = model(x), block(_rms(x))
        assert torch.equal(model(x), grouped)
    assert bool(per_expert.isfinite().all()) and bool(grouped.isfinite().all())
    ref = one.float()
    assert float((one_grouped.float() - ref).abs().max() / ref.abs().max()) < 2**-6


def test_run_estimate_adds_the_grouped_workspace_for_w8a16_experts_only(cache, base_checkpoint, monkeypatch) -> None:
    """per_run.inference_bytes = the estimator's activations + moe_grouped.workspace_bytes, which is
    the chunk activations + scratch bound for W8A16 SiLU experts and 0 for bf16 ones or HY3_MOE_GROUPED=0."""
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.per_run import inference_bytes

    int8 = cache.get(cache.load(LoadSpec(str(base_checkpoint), quant="int8", int8_format="w8a16")))
    down = int8.model.model.layers[0].mlp.experts[0].down_proj
    expected = mg.workspace_bytes_for(down.out_features, down.in_features)
    assert mg.workspace_bytes(int8.model) == expected > mg.SCRATCH_BYTES
    with_ws = inference_bytes(int8, 1024, 1024)
    monkeypatch.setenv(mg.GROUPED_ENV, "0")
    assert mg.workspace_bytes(int8.model) == 0
    assert inference_bytes(int8, 1024, 1024) == with_ws - expected
    monkeypatch.delenv(mg.GROUPED_ENV)
    bf16 = cache.get(cache.load(LoadSpec(str(base_checkpoint))))
    assert mg.workspace_bytes(bf16.model) == 0
