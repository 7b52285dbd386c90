"""The "dequantize, then bf16 GEMM" W8A16 MoE engines (hunyuan_loader/kernels/w8a16_dequant.py) and the
dispatch's engine choice (hunyuan_loader/hooks/moe_dispatch.py). The dequantization kernel runs in
Triton's CPU interpreter (a subprocess); GPU tests are marked."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import pytest
import torch
from triton_interpreter import PRELUDE, interpret, needs_triton

from hunyuan_image3.hunyuan_loader.formats.w8a16 import dequantize_weight, quantize_weight
from hunyuan_image3.hunyuan_loader.hooks import moe_dispatch as md
from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg
from hunyuan_image3.hunyuan_loader.hooks.registry import registry
from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def _experts(e: int, n: int, k: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ws, ss = zip(*[quantize_weight(torch.randn(n, k, generator=g) * 0.05) for _ in range(e)])
    return list(ws), list(ss)


def test_torch_fallback_is_dequantize_weight_bit_for_bit() -> None:
    ws, ss = _experts(3, 24, 40)
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.full((4, 24, 40), 7.0, dtype=dtype)
        D.dequantize_into(ws, ss, out, use_triton=False)
        for i in range(3):
            assert torch.equal(out[i], dequantize_weight(ws[i], ss[i], dtype))
        assert bool((out[3] == 7).all())  # the spare slot is left alone
    with pytest.raises(ValueError, match="cannot hold"):
        D.dequantize_into(ws, ss, torch.empty(2, 24, 40, dtype=torch.bfloat16))


_KERNEL = PRELUDE + r"""
from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D
from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight, dequantize_weight
torch.manual_seed(0)
# N*K not a multiple of BLOCK (a partial last program), weights allocated out of order (the base
# pointer is the lowest address), large and tiny values (rounding ties and subnormal-free range).
D.BLOCK = 256
ws, ss = zip(*[quantize_weight(torch.randn(48, 80) * 10 ** (i - 2)) for i in range(4)])
ws, ss = list(ws)[::-1], list(ss)[::-1]
for dtype in (torch.bfloat16, torch.float16):
    out = torch.empty(5, 48, 80, dtype=dtype)
    D.dequantize_into(ws, ss, out, use_triton=True)
    for i in range(4):
        ref = dequantize_weight(ws[i], ss[i], dtype)
        assert torch.equal(out[i], ref), (dtype, i, int((out[i] != ref).sum()))
print("KERNEL OK")
"""


def _variant(script: str, variant: str) -> str:
    """``script`` run with the dequantization kernel ``variant`` (w8a16_dequant.KERNEL_ENV, read per call)."""
    return f"import os\nos.environ['HY3_DEQUANT_KERNEL'] = {variant!r}\n" + script


@needs_triton
@pytest.mark.parametrize("variant", ["flat", "rows"])
def test_dequant_kernel_bit_exact_in_the_triton_interpreter(variant: str) -> None:
    interpret(_variant(_KERNEL, variant))


_GROUPS = PRELUDE + r"""
from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D
from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight, dequantize_weight
torch.manual_seed(0)
# Two Linears in ONE launch, as a chunk's gate_up and down: different N*K (the grid covers the larger;
# the smaller entries' extra programs must write nothing), neither a multiple of BLOCK, the second
# group at an output offset with a gap before it; weights and scales of both allocated interleaved.
D.BLOCK = 256
gu, dn = [], []
for i in range(3):
    gu.append(quantize_weight(torch.randn(48, 80) * 10 ** (i - 1)))
    dn.append(quantize_weight(torch.randn(40, 24) * 10 ** (1 - i)))
gw, gs = [w for w, _ in gu][::-1], [s for _, s in gu][::-1]
dw, ds = [w for w, _ in dn], [s for _, s in dn]
off = 3 * 48 * 80 + 300
for dtype in (torch.bfloat16, torch.float16):
    out = torch.full((off + 3 * 40 * 24 + 200,), 7.0, dtype=dtype)
    groups = [(gw, gs, 0), (dw, ds, off)]
    D.dequantize_groups(groups, out, use_triton=True)
    for i in range(3):
        a = out[i * 3840:(i + 1) * 3840].view(48, 80)
        assert torch.equal(a, dequantize_weight(gw[i], gs[i], dtype)), (dtype, "gate_up", i)
        b = out[off + i * 960: off + (i + 1) * 960].view(40, 24)
        assert torch.equal(b, dequantize_weight(dw[i], ds[i], dtype)), (dtype, "down", i)
    assert bool((out[3 * 3840:off] == 7).all()) and bool((out[off + 3 * 960:] == 7).all()), "wrote outside"
    again = torch.zeros_like(out)
    D.dequantize_groups(groups, again, use_triton=True, table=torch.tensor(D.entry_table(groups)))
    assert torch.equal(again[:3 * 3840], out[:3 * 3840]) and torch.equal(again[off:off + 2880], out[off:off + 2880])
# The pipeline's pair launches through the kernel (its table cache used as on CUDA): the same bits as the
# torch path, one launch per chunk.
D.kernel_table = D.cached_table
stages = [(gw, gs), (dw, ds), (gw[:1], gs[:1]), (dw[:1], ds[:1])]
pipe = D.DequantPipeline(stages, torch.bfloat16, torch.device("cpu"))
assert pipe.pair
for j, (ws, ss) in enumerate(stages):
    w = pipe.acquire(j)
    for i in range(len(ws)):
        assert torch.equal(w[i], dequantize_weight(ws[i], ss[i], torch.bfloat16)), (j, i)
    pipe.release(j)
assert [t[1] for t in pipe.trace if t[0] == "launch"] == [(0, 1), (2, 3)]
assert len(D._tables) == 2 and all(t is not None for t in D._tables.values())
print("KERNEL OK")
"""


@needs_triton
@pytest.mark.parametrize("variant", ["flat", "rows"])
def test_dequant_kernel_two_linears_one_launch_in_the_triton_interpreter(variant: str) -> None:
    interpret(_variant(_GROUPS, variant))


def test_dequant_kernel_variant_is_checked(monkeypatch) -> None:
    """A bad value is a clear error where the grouped MoE starts (not an engine failure, logged and dropped)."""
    monkeypatch.setenv("HY3_DEQUANT_KERNEL", "fast")
    with pytest.raises(ValueError, match="HY3_DEQUANT_KERNEL"):
        D.dequant_kernel_variant()
    gu, gs = _experts(1, 16, 8)
    dn, ds = _experts(1, 8, 8, seed=1)
    experts = [types.SimpleNamespace(gate_and_up_proj=types.SimpleNamespace(weight=gu[0], weight_scale=gs[0]),
                                     down_proj=types.SimpleNamespace(weight=dn[0], weight_scale=ds[0]))]
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="HY3_DEQUANT_KERNEL"):
        list(mg.grouped_chunks(experts, x, torch.arange(2), [2], "linear"))
    assert "linear" not in mg._grouped_off
    monkeypatch.setenv("HY3_DEQUANT_KERNEL", " Rows ")
    assert D.dequant_kernel_variant() == "rows"
    monkeypatch.delenv("HY3_DEQUANT_KERNEL")
    assert D.dequant_kernel_variant() == "rows"


@pytest.mark.parametrize("packed", [True, False])
def test_gemm_rows_linear_is_one_matmul_per_expert(packed: bool) -> None:
    """Each expert's rows times its weight, whether the rows lie back to back (views made by one split)
    or at given starts with gaps (views sliced one by one); an expert without rows is skipped."""
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    starts = [0, 3, 3, 8] if packed else [0, 4, 6, 13]
    xs = torch.randn(16 if not packed else 10, 8)
    w = torch.randn(4, 6, 8)
    y = D.gemm_rows(xs, w, counts, gemm="linear", starts=starts)
    for i, (s0, c) in enumerate(zip(starts, counts)):
        if c:
            assert torch.equal(y[s0:s0 + c], xs[s0:s0 + c] @ w[i].t()), i


def test_scratch_chunking() -> None:
    # real shapes: gate_and_up 6144 x 4096 (48 MiB in bf16) + down 4096 x 3072 (24 MiB), both buffers
    # held at once (the overlapped pipeline): 512 MiB -> 7 experts
    assert D.experts_per_chunk([(6144, 4096), (4096, 3072)], 512 * 2**20) == 7
    assert D.experts_per_chunk([(6144, 4096)], 1) == 1
    counts = [5, 0, 5, 5, 0, 0, 5, 5]
    assert mg._expert_chunks(counts, 2) == [(0, 3), (3, 7), (7, 8)]  # at most 2 experts WITH rows each
    assert mg._expert_chunks(counts) == [(0, 8)]
    assert mg._expert_chunks([], 2) == [(0, 0)]


def test_gather_index_pads_each_expert() -> None:
    assert D.padded_rows([0, 1, 16, 17], 16) == [0, 16, 16, 32]
    pos, starts = D.gather_index([3, 0, 2], 4)
    assert pos.tolist() == [0, 1, 2, 2, 3, 4, 4, 4] and starts == [0, 4, 4] and pos.dtype == torch.int64
    pos, starts = D.gather_index([16, 1, 17], 16)
    assert pos.tolist() == list(range(16)) + [16] * 16 + list(range(17, 34)) + [33] * 15
    assert starts == [0, 16, 32]


def test_engine_modes_and_env_override(monkeypatch) -> None:
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert mg.grouped_mode() == "auto"
    assert mg.grouped_engines(x) == []  # auto on the CPU: the per-expert plain path
    monkeypatch.setenv(mg.GROUPED_ENV, "linear")
    assert mg.grouped_engines(x) == ["linear"]
    monkeypatch.setenv(mg.GROUPED_ENV, "dequant")
    assert mg.grouped_engines(x) == (["dequant"] if D.grouped_mm_available(x) else [])
    assert mg.grouped_engines(x.float()) == []  # the engines are for bf16 / fp16 activations
    monkeypatch.setenv(mg.GROUPED_ENV, "0")
    assert mg.grouped_mode() == "off" and mg.grouped_engines(x) == []
    monkeypatch.setenv(mg.GROUPED_ENV, "cutlass")
    with pytest.raises(ValueError, match="auto, triton, dequant, linear or 0"):
        mg.grouped_mode()


@pytest.mark.parametrize("engine", ["linear", "dequant"])
def test_dispatch_engine_matches_per_expert_on_cpu(engine: str, monkeypatch) -> None:
    from test_w8a16_grouped import _block

    x0 = torch.zeros(1, 8, dtype=torch.bfloat16)
    if engine == "dequant" and not D.grouped_mm_available(x0):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    model, block = _block(torch.bfloat16, topk=2)
    x = (torch.rand(2, 37, 64, generator=torch.Generator().manual_seed(1)) + 0.05).to(torch.bfloat16)
    calls = []
    real = D.gemm_rows
    monkeypatch.setattr(D, "gemm_rows", lambda *a, **k: calls.append(k["gemm"]) or real(*a, **k))
    with torch.no_grad():
        per_expert = block(x)
        assert not calls
        monkeypatch.setenv(mg.GROUPED_ENV, engine)
        ours = block(x)
        assert calls == [{"linear": "linear", "dequant": "grouped_mm"}[engine]] * 2
        assert torch.equal(block(x), ours)
        monkeypatch.setattr(mg, "SCRATCH_BYTES", 1)  # one expert per chunk: many chunks, same result
        n = len(calls)
        chunked = block(x)
        top = md.route(md.router_logits(block.gate, x.reshape(-1, 64)), registry(model).get("moe_dispatch").rules[0])[0]
        assert 3 not in top.tolist() and len(calls) - n == 2 * top.unique().numel() > 4
        real_pipe = D.DequantPipeline
        monkeypatch.setattr(D, "DequantPipeline", lambda *a, **k: real_pipe(*a, **{**k, "prefetch": True}))
        prefetched = block(x)  # the overlapped issue order (next stage dequantized before the GEMMs)
    ref = per_expert.float()
    for y in (ours, chunked):
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 2**-7
    assert torch.equal(chunked, ours) or engine == "dequant"  # linear: the same matmul per expert either way
    assert torch.equal(prefetched, chunked)


def _stages(shapes: list[tuple[int, int, int]], device: str = "cpu") -> list[tuple[list, list]]:
    out = []
    for j, (e, n, k) in enumerate(shapes):
        if device == "meta":
            out.append(([torch.empty(n, k, dtype=torch.int8, device="meta")] * e,
                        [torch.empty(n, dtype=torch.bfloat16, device="meta")] * e))
        else:
            out.append(_experts(e, n, k, seed=j))
    return out


@pytest.mark.parametrize("mode", ["pair", "stage", "prefetch"])
def test_pipeline_bookkeeping_on_cpu(mode: str) -> None:
    """The double-buffer plan with the streams bypassed: stage j in buffer j % 2 (both buffers parts
    of one allocation, the second from an OUT_ALIGN multiple), each buffer as big as its largest
    stage, every stage exactly once, in order, and the weights each stage hands out are its own.
    pair (the default without overlap): one launch per chunk, (2c, 2c+1), issued at acquire(2c);
    stage: one launch per stage, each in its acquire; prefetch (the overlapped order): one launch
    per stage, the next one issued before this one's GEMMs."""
    shapes = [(3, 24, 16), (3, 16, 12), (1, 24, 16), (1, 16, 12), (2, 24, 16), (2, 16, 12)]
    stages = _stages(shapes)
    kw = {"pair": {}, "stage": {"pair": False}, "prefetch": {"prefetch": True, "pair": True}}[mode]
    pipe = D.DequantPipeline(stages, torch.bfloat16, torch.device("cpu"), **kw)
    assert not pipe.overlap  # no CUDA streams on the CPU
    assert pipe.pair == (mode == "pair")  # prefetch turns the pair launches off (per-stage under overlap)
    assert [b.numel() for b in pipe.buffers] == [3 * 24 * 16, 3 * 16 * 12]
    second = -(-3 * 24 * 16 // D.OUT_ALIGN) * D.OUT_ALIGN
    assert pipe.offsets == (0, second) and pipe.buffers[1].data_ptr() == pipe.scratch.data_ptr() + 2 * second
    assert pipe.nbytes() == 2 * (second + 3 * 16 * 12)
    for j, (ws, ss) in enumerate(stages):
        w = pipe.acquire(j)
        assert w.shape == shapes[j]
        assert w.data_ptr() == pipe.buffers[j % 2].data_ptr()
        for i in range(len(ws)):
            assert torch.equal(w[i], dequantize_weight(ws[i], ss[i], torch.bfloat16)), (j, i)
        pipe.release(j)
    pipe.close()
    gemms = [t for t in pipe.trace if t[0] == "gemm"]
    deqs = [t for t in pipe.trace if t[0] == "dequant"]
    launches = [t[1] for t in pipe.trace if t[0] == "launch"]
    assert gemms == [("gemm", j) for j in range(6)]
    assert deqs == [("dequant", j, j % 2) for j in range(6)]
    assert launches == ([(0, 1), (2, 3), (4, 5)] if mode == "pair" else [(j,) for j in range(6)])
    order = [t[:2] for t in pipe.trace]
    for j in range(6):  # dequant j before gemm j; dequant j+1 too with prefetch (it overlaps gemm j) or in a pair
        assert order.index(("dequant", j)) < order.index(("gemm", j))
        if j + 1 < 6:
            before = order.index(("dequant", j + 1)) < order.index(("gemm", j))
            assert before == (mode == "prefetch" or (mode == "pair" and j % 2 == 0))
            # never more than one stage ahead: buffer (j+1) % 2 was last read by gemm j-1
            assert j == 0 or order.index(("gemm", j - 1)) < order.index(("dequant", j + 1))
        if mode == "pair":  # the launch of chunk j // 2 comes right before its gate_up GEMMs
            assert order.index(("launch", (j - j % 2, j - j % 2 + 1))) == order.index(("gemm", j - j % 2)) - 3


def test_pipeline_views_made_once_per_shape() -> None:
    """The [E, N, K] views and their per-expert transposes are made once per (buffer, shape) and
    reused by later stages of that shape; another expert count gets its own."""
    shapes = [(3, 24, 16), (3, 16, 12), (3, 24, 16), (3, 16, 12), (1, 24, 16), (1, 16, 12)]
    pipe = D.DequantPipeline(_stages(shapes), torch.bfloat16, torch.device("cpu"))
    v0, v2, v4 = pipe.acquire(0), pipe.acquire(2), pipe.acquire(4)
    assert v0 is v2 and v4 is not v0 and v4.shape == (1, 24, 16) and v4.data_ptr() == v0.data_ptr()
    t0 = pipe.transposed(0)
    assert t0 is pipe.transposed(2) and len(t0) == 3
    assert all(torch.equal(t, v0[i].T) and t.data_ptr() == v0[i].data_ptr() for i, t in enumerate(t0))
    assert pipe.transposed(1) is not t0 and pipe.transposed(1)[0].shape == (12, 16)


def test_pair_env_switch(monkeypatch) -> None:
    cpu = torch.device("cpu")
    stages = _stages([(1, 24, 16), (1, 16, 12)])
    monkeypatch.delenv(D.PAIR_ENV, raising=False)
    assert D.pair_enabled() and D.DequantPipeline(stages, torch.bfloat16, cpu).pair
    monkeypatch.setenv(D.PAIR_ENV, "0")
    assert not D.pair_enabled() and not D.DequantPipeline(stages, torch.bfloat16, cpu).pair
    monkeypatch.setenv(D.PAIR_ENV, "maybe")
    with pytest.raises(ValueError, match=D.PAIR_ENV):
        D.pair_enabled()


def test_pipeline_memory_bound_real_shapes() -> None:
    """Both buffers of the real config's chunk (7 experts, gate_up 6144 x 4096, down 4096 x 3072)
    within SCRATCH_BYTES; the chunking is the same with and without overlap."""
    import types

    e = mg.scratch_experts([types.SimpleNamespace(gate_and_up_proj=types.SimpleNamespace(weight=torch.empty(6144, 4096, device="meta")),
                                                  down_proj=types.SimpleNamespace(weight=torch.empty(4096, 3072, device="meta")))])
    assert e == 7
    stages = _stages([(e, 6144, 4096), (e, 4096, 3072)] * 3 + [(1, 6144, 4096), (1, 4096, 3072)], "meta")
    pipe = D.DequantPipeline(stages, torch.bfloat16, torch.device("meta"), overlap=True)
    assert not pipe.overlap and pipe.nbytes() <= mg.SCRATCH_BYTES
    assert pipe.nbytes() == 7 * (6144 + 3072) * 4096 * 2


def test_overlap_env_switch(monkeypatch) -> None:
    """Off unless HY3_MOE_OVERLAP=1 (measured slower overlapped on the H200), never on the CPU."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(D.OVERLAP_ENV, raising=False)
    assert not D.overlap_enabled(cuda) and not D.overlap_enabled(cpu)
    for off in ("0", "off", "false"):
        monkeypatch.setenv(D.OVERLAP_ENV, off)
        assert not D.overlap_enabled(cuda)
    for on in ("1", "on", "true"):
        monkeypatch.setenv(D.OVERLAP_ENV, on)
        assert D.overlap_enabled(cuda) and not D.overlap_enabled(cpu)


def test_offset_tables_only_on_cuda() -> None:
    ws, ss = _experts(2, 8, 16)
    D.clear_tables()
    assert D.kernel_table([(ws, ss, 0)], torch.device("cpu")) is None and not D._tables



def test_entry_table_rows() -> None:
    """One row per expert of every group, in order: weight and scale offsets from the lowest address of
    their kind over ALL groups (ALIGN units), N*K, K, output offset (group offset + i * N*K)."""
    gu, gs = _experts(2, 8, 16, seed=1)
    dw, ds = _experts(3, 4, 16, seed=2)
    w0 = min(t.data_ptr() for t in gu + dw)
    s0 = min(t.data_ptr() for t in gs + ds)
    for off, unit in ((512, D.E_UNIT_MAX), (520, 1)):  # K 16 and 16: the offset decides the unit
        groups = [(gu, gs, 0), ([], [], 5), (dw, ds, off)]
        assert D.entry_unit(groups) == unit
        rows = D.entry_table(groups)
        assert len(rows) == 5 * D.ENTRY_COLS
        want = []
        for ws, ss, o in ((gu, gs, 0), (dw, ds, off)):
            n, k = ws[0].shape
            for i, (w, sc) in enumerate(zip(ws, ss)):
                want += [(w.data_ptr() - w0) // D.ALIGN, (sc.data_ptr() - s0) // D.ALIGN, n * k // unit,
                         k // unit, (o + i * n * k) // unit]
        assert rows == want
    odd, oddscale = _experts(2, 3, 5, seed=3)  # K 5: unit 1
    assert D.entry_unit([(odd, oddscale, 0)]) == 1
    narrow, narrows = _experts(2, 32, 8, seed=4)  # N*K 256 but K 8: unit 1 (the kernels take K in the unit too)
    assert D.entry_unit([(narrow, narrows, 0)]) == 1
    assert D.offset_table(gu, gs) == D.entry_table([(gu, gs, 0)])


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_offset_tables_are_cached_by_address_and_cleared() -> None:
    """The same experts at the same addresses reuse one GPU table (no copy per MoE call); another order
    is another key; clear_tables (the cache's drop) forgets them; the kernel reads the right experts."""
    g = torch.Generator("cuda").manual_seed(1)
    ws, ss = map(list, zip(*[quantize_weight(torch.randn(256, 128, device="cuda", generator=g)) for _ in range(4)]))
    dev = torch.device("cuda", 0)
    D.clear_tables()
    t1 = D.kernel_table([(ws, ss, 0)], dev)
    assert t1 is not None and D.kernel_table([(ws, ss, 0)], dev) is t1 and len(D._tables) == 1
    assert t1.tolist() == D.offset_table(ws, ss)
    rev = D.kernel_table([(ws[::-1], ss[::-1], 0)], dev)
    assert rev is not t1 and rev.tolist() == D.offset_table(ws[::-1], ss[::-1]) and len(D._tables) == 2
    out = torch.empty(4, 256, 128, dtype=torch.bfloat16, device="cuda")
    D.dequantize_into(ws[::-1], ss[::-1], out, use_triton=True, table=rev)
    for i, (w, s) in enumerate(zip(ws[::-1], ss[::-1])):
        assert torch.equal(out[i], dequantize_weight(w, s, torch.bfloat16)), i
    D.clear_tables()
    assert not D._tables


@pytest.mark.gpu
def test_gpu_a_full_table_cache_starts_again(monkeypatch) -> None:
    g = torch.Generator("cuda").manual_seed(2)
    ws, ss = map(list, zip(*[quantize_weight(torch.randn(64, 32, device="cuda", generator=g)) for _ in range(3)]))
    dev = torch.device("cuda", 0)
    D.clear_tables()
    monkeypatch.setattr(D, "TABLES_MAX", 2)
    D.kernel_table([(ws[:1], ss[:1], 0)], dev)
    D.kernel_table([(ws[1:2], ss[1:2], 0)], dev)
    assert len(D._tables) == 2
    t = D.kernel_table([(ws[2:], ss[2:], 0)], dev)
    assert len(D._tables) == 1 and t.tolist() == D.offset_table(ws[2:], ss[2:])
    D.clear_tables()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["flat", "rows"])
def test_gpu_dequant_kernel_bit_exact_real_shapes(variant: str, monkeypatch) -> None:
    monkeypatch.setenv("HY3_DEQUANT_KERNEL", variant)
    g = torch.Generator("cuda").manual_seed(0)
    ws, ss = zip(*[quantize_weight(torch.randn(6144, 4096, device="cuda", generator=g) * 0.02) for _ in range(3)])
    out = torch.empty(3, 6144, 4096, dtype=torch.bfloat16, device="cuda")
    D.dequantize_into(list(ws)[::-1], list(ss)[::-1], out)
    for i, (w, s) in enumerate(zip(list(ws)[::-1], list(ss)[::-1])):
        assert torch.equal(out[i], dequantize_weight(w, s, torch.bfloat16)), i


@pytest.mark.gpu
def test_gpu_grouped_mm_row_alignment() -> None:
    """What torch._grouped_mm accepts here: padded offsets (what the engine sends) must work; offsets
    that are not multiples of 16 are reported (the engine pads, so either answer is fine)."""
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16)
    assert D.grouped_mm_available(x)
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([32, 64], dtype=torch.int32, device="cuda"))
    ref = torch.cat([x[:32] @ w[0].T, x[32:] @ w[1].T])
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2**-7
    try:
        torch._grouped_mm(x[:37], w.transpose(-2, -1), offs=torch.tensor([5, 37], dtype=torch.int32, device="cuda"))
        print("torch._grouped_mm accepts offsets that are not multiples of 16")
    except RuntimeError as exc:
        print(f"torch._grouped_mm refuses unaligned offsets: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["triton", "dequant", "linear", "auto"])
@pytest.mark.parametrize("tokens", [1, 37, 1056, 8448])
def test_gpu_engine_matches_per_expert_and_repeats(engine: str, tokens: int, monkeypatch) -> None:
    from test_w8a16_grouped import _gpu_layer

    _, block = _gpu_layer()
    x = torch.randn(1, tokens, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(tokens))
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setenv(mg.GROUPED_ENV, "0")
        per_expert = block(x)
        monkeypatch.setenv(mg.GROUPED_ENV, engine)
        assert mg.grouped_w8a16_reason(block.experts, x.reshape(-1, 1024)) is None
        ours = [block(x) for _ in range(3)]
    assert all(torch.equal(o, ours[0]) for o in ours[1:])
    ref = per_expert.float()
    err = float((ours[0].float() - ref).abs().max() / ref.abs().max())
    assert err < 2**-6, err
    if engine == "auto" and tokens >= 1056:
        print("engine choices:", mg.engine_choices())


@functools.lru_cache(maxsize=1)
def _real_width_block():
    from test_w8a16_grouped import _block

    return _block(torch.bfloat16, topk=8, experts=16, device="cuda", hidden=4096, width=3072)[1]


def _real_width_run(tokens: int, seed: int, engine: str, monkeypatch) -> tuple:
    """(the real-width MoE block, a bf16 input of ``tokens``, the list every DequantPipeline made is added
    to) with ``engine`` forced."""
    block = _real_width_block()
    x = torch.randn(1, tokens, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    pipes: list = []
    real = D.DequantPipeline

    def spy(*a, **k):
        pipes.append(real(*a, **k))
        return pipes[-1]

    monkeypatch.setattr(D, "DequantPipeline", spy)
    monkeypatch.setenv(mg.GROUPED_ENV, engine)
    return block, (x * 0.5).to(torch.bfloat16), pipes


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["linear", "dequant", "auto"])
def test_gpu_overlap_is_bit_identical_to_sequential(engine: str, monkeypatch) -> None:
    """The real widths (hidden 4096, expert width 3072), 16 experts, top-8, 4224 tokens: ~2100 rows
    per expert, chunks of 7 experts (3 chunks, 6 stages): the overlapped dequantization (side stream,
    double buffer) gives the same bits as HY3_MOE_OVERLAP=0, on every one of 3 runs (a missing
    event would let a dequantization overwrite a buffer a GEMM still reads)."""
    block, x, pipes = _real_width_run(4224, 3, engine, monkeypatch)
    with torch.no_grad():
        monkeypatch.setenv(D.OVERLAP_ENV, "0")
        seq = block(x)
        seq_pipes, pipes[:] = list(pipes), []
        monkeypatch.setenv(D.OVERLAP_ENV, "1")
        ours = [block(x) for _ in range(3)]
        torch.cuda.synchronize()
    assert torch.isfinite(seq).all()
    for o in ours:
        assert torch.equal(o, seq), float((o.float() - seq.float()).abs().max())
    used = [p for p in pipes if len(p.stages) > 2]  # the layer's pipeline, not the engine timing's
    if engine != "auto":  # (auto may pick the Triton engine: no pipeline)
        assert used and all(p.overlap for p in used) and not any(p.overlap for p in seq_pipes)
        t = [e[:2] for e in used[0].trace]
        assert t.index(("dequant", 1)) < t.index(("gemm", 0))  # issued ahead: it can overlap
    print(engine, "stages", [len(p.stages) for p in used], "choices", mg.engine_choices())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["flat", "rows"])
def test_gpu_two_linears_one_launch_bit_exact_real_shapes(variant: str, monkeypatch) -> None:
    """A chunk's gate_up (6144 x 4096) and down (4096 x 3072) experts in ONE launch into one scratch,
    the down part from an offset: each expert bit for bit dequantize_weight; nothing written between."""
    monkeypatch.setenv("HY3_DEQUANT_KERNEL", variant)
    g = torch.Generator("cuda").manual_seed(4)
    gu = [quantize_weight(torch.randn(6144, 4096, device="cuda", generator=g) * 0.02) for _ in range(2)]
    dn = [quantize_weight(torch.randn(4096, 3072, device="cuda", generator=g) * 0.02) for _ in range(2)]
    off = 2 * 6144 * 4096 + D.OUT_ALIGN
    out = torch.full((off + 2 * 4096 * 3072,), 7.0, dtype=torch.bfloat16, device="cuda")
    groups = [([w for w, _ in gu][::-1], [s for _, s in gu][::-1], 0), ([w for w, _ in dn], [s for _, s in dn], off)]
    D.clear_tables()
    table = D.kernel_table(groups, torch.device("cuda", 0))
    assert table is not None and D.kernel_table(groups, torch.device("cuda", 0)) is table
    D.dequantize_groups(groups, out, use_triton=True, table=table)
    for ws, ss, o in groups:
        n, k = ws[0].shape
        for i, (w, sc) in enumerate(zip(ws, ss)):
            assert torch.equal(out[o + i * n * k: o + (i + 1) * n * k].view(n, k), dequantize_weight(w, sc, torch.bfloat16))
    assert bool((out[2 * 6144 * 4096:off] == 7).all())
    D.clear_tables()


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["linear", "dequant"])
def test_gpu_pair_launch_and_scratch_size_keep_the_bits(engine: str, monkeypatch) -> None:
    """The real widths, 16 experts, top-8, 2112 tokens (~1056 rows per expert, as at 1 MP): one
    dequantization launch per chunk (HY3_MOE_PAIR_DEQUANT=1, the default) gives the bits of one
    launch per Linear, and a 1024 MiB scratch (up to 14 experts per chunk instead of 7: fewer
    chunks) the same bits again for the linear engine (the same matmul per expert; torch._grouped_mm's
    kernels may depend on the group count)."""
    block, x, pipes = _real_width_run(2112, 5, engine, monkeypatch)
    monkeypatch.delenv(D.OVERLAP_ENV, raising=False)
    out, stages = {}, {}
    with torch.no_grad():
        for pair, mb in (("0", "512"), ("1", "512"), ("1", "1024")):
            monkeypatch.setenv(D.PAIR_ENV, pair)
            monkeypatch.setenv(mg.SCRATCH_ENV, mb)
            pipes[:] = []
            out[pair, mb] = block(x)
            p = pipes[-1]
            stages[pair, mb] = len(p.stages)
            launches = [t[1] for t in p.trace if t[0] == "launch"]
            assert len(launches) == (len(p.stages) // 2 if pair == "1" else len(p.stages)), launches
        torch.cuda.synchronize()
    assert torch.isfinite(out["0", "512"]).all()
    assert stages["1", "1024"] < stages["1", "512"] == stages["0", "512"], stages  # fewer, bigger chunks
    assert torch.equal(out["1", "512"], out["0", "512"])
    if engine == "linear":
        assert torch.equal(out["1", "1024"], out["0", "512"])


_WITHOUT_TRITON = r"""
import os, sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on a machine without Triton (Windows)
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
sys.path.insert(0, {tests!r} + "/kernels")
from hunyuan_loader.standalone import load_pack
load_pack()
import torch
from test_w8a16_grouped import _block
from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg
from hunyuan_image3.hunyuan_loader.core import settings
from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D
_, block = _block(torch.bfloat16, topk=2)
x = (torch.rand(2, 37, 64, generator=torch.Generator().manual_seed(1)) + 0.05).to(torch.bfloat16)
with torch.no_grad():
    ref = block(x)
    for engine in ("linear",) + (("dequant",) if D.grouped_mm_available(x) else ()):
        os.environ[mg.GROUPED_ENV] = engine
        settings.refresh()  # settings are parsed once: re-read the changed variable
        assert mg.grouped_w8a16_reason(block.experts, x.reshape(-1, 64)) is None, engine
        out = block(x)
        assert float((out.float() - ref.float()).abs().max()) <= 2**-6 * float(ref.float().abs().max()), engine
        print("engine", engine, "ran without Triton")
assert "hunyuan_image3.hunyuan_loader.kernels.w8a16_grouped" not in sys.modules
print("KERNEL OK")
"""


def test_dequant_engines_run_without_triton() -> None:
    """The dequant engines (and the engine choice, the chunk bookkeeping) import nothing that needs
    Triton: on a machine without it the grouped path works, only the Triton engine is missing."""
    assert "engine linear ran without Triton" in interpret(_WITHOUT_TRITON)  # (the interpreter flag is unused)


# -- host work per chunk (issue 14: the host, not the GPU, set the pace on the H200) ----------------
@needs_triton
def test_table_cache_hits_by_address_and_refuses_non_contiguous() -> None:
    """The cache's logic (run on the CPU through cached_table): the same tensors at the same addresses
    get the same table object (no new one per call); a non-contiguous view arriving at cached
    addresses (a square weight transposed: same address, same shape) gets None, not the cached
    table, and leaves the entry alone; a non-contiguous tensor at a new address is refused too."""
    cpu = torch.device("cpu")
    ws, ss = _experts(3, 16, 16)
    dws, dss = _experts(2, 8, 16, seed=3)
    D.clear_tables()
    try:
        groups = [(ws, ss, 0), (dws, dss, 3 * 256)]
        t = D.cached_table(groups, cpu)
        assert t is not None and t.tolist() == D.entry_table(groups)
        assert D.cached_table(groups, cpu) is t and len(D._tables) == 1
        assert D.cached_table([(ws, ss, 0), (dws, dss, 1024)], cpu) is not t  # another output offset: its own
        flipped = [ws[0].t(), *ws[1:]]
        assert flipped[0].data_ptr() == ws[0].data_ptr() and flipped[0].shape == ws[0].shape
        assert D.cached_table([(flipped, ss, 0), (dws, dss, 3 * 256)], cpu) is None
        assert D.cached_table(groups, cpu) is t
        strided = torch.empty(16, 32, dtype=torch.int8)[:, ::2]
        assert D.cached_table([([strided, *ws[1:]], ss, 0)], cpu) is None
        out = torch.empty(3, 16, 16, dtype=torch.bfloat16)
        D.dequantize_into([flipped[0]], ss[:1], out, use_triton=False)  # the torch path is right for it
        assert torch.equal(out[0], dequantize_weight(flipped[0], ss[0], torch.bfloat16))
    finally:
        D.clear_tables()


def test_gemm_rows_with_pretransposed_weights() -> None:
    """The linear engine's GEMMs from the pipeline's cached w[e].T views (and packed=True) are the
    same matmuls as from the stacked weights."""
    torch.manual_seed(1)
    counts = [3, 0, 5, 2]
    xs = torch.randn(10, 8).to(torch.bfloat16)
    w = torch.randn(4, 6, 8).to(torch.bfloat16)
    ref = D.gemm_rows(xs, w, counts, gemm="linear", starts=[0, 3, 3, 8])
    got = D.gemm_rows(xs, w, counts, gemm="linear", starts=[0, 3, 3, 8], wt=w.transpose(1, 2).unbind(0), packed=True)
    assert torch.equal(ref, got)


def test_scratch_env(monkeypatch) -> None:
    """HY3_MOE_SCRATCH_MB sets the dequant buffers' bytes (default 512 MiB: 7 real-size experts per
    chunk; 1024: 14), and so the workspace of the run estimate and the card plan; a bad value is a
    ValueError naming the variable."""
    import types

    from hunyuan_image3.hunyuan_loader.cli.card_plan import moe_workspace_bytes, real_model_sizes

    real = [types.SimpleNamespace(gate_and_up_proj=types.SimpleNamespace(weight=torch.empty(6144, 4096, device="meta")),
                                  down_proj=types.SimpleNamespace(weight=torch.empty(4096, 3072, device="meta")))]
    monkeypatch.delenv(mg.SCRATCH_ENV, raising=False)
    base = mg.workspace_bytes_for(4096, 3072)
    plan = moe_workspace_bytes(real_model_sizes(), "int8")
    assert mg.scratch_bytes() == mg.SCRATCH_BYTES == 512 * 2**20 and mg.scratch_experts(real) == 7
    assert plan == base
    monkeypatch.setenv(mg.SCRATCH_ENV, " 1024 ")
    assert mg.scratch_bytes() == 2**30 and mg.scratch_experts(real) == 14
    assert mg.workspace_bytes_for(4096, 3072) == base + 512 * 2**20
    assert moe_workspace_bytes(real_model_sizes(), "int8") == plan + 512 * 2**20
    stages = _stages([(14, 6144, 4096), (14, 4096, 3072)], "meta")
    assert D.DequantPipeline(stages, torch.bfloat16, torch.device("meta")).nbytes() <= mg.scratch_bytes()
    for bad in ("0", "-1", "1.5", "big"):
        monkeypatch.setenv(mg.SCRATCH_ENV, bad)
        with pytest.raises(ValueError, match=mg.SCRATCH_ENV):
            mg.scratch_bytes()
        with pytest.raises(ValueError, match=mg.SCRATCH_ENV):
            mg.workspace_bytes_for(4096, 3072)


def test_grouped_chunks_host_work(monkeypatch) -> None:
    """Per MoE call on a real ModuleList of experts: no ModuleList built by slicing (one per chunk and
    use before), the engine list asked once (not per chunk), one dequantization launch per chunk
    (the pair), and the same bits as per-stage launches and as the per-expert path's matmuls."""
    from test_w8a16_grouped import _block

    _, block = _block(torch.bfloat16, topk=2)
    assert isinstance(block.experts, torch.nn.ModuleList)
    x = (torch.rand(2, 37, 64, generator=torch.Generator().manual_seed(1)) + 0.05).to(torch.bfloat16)
    monkeypatch.setenv(mg.GROUPED_ENV, "linear")
    monkeypatch.setattr(mg, "SCRATCH_BYTES", 1)  # one expert per chunk: many chunks
    built, asked, pipes = [], [], []
    init, engines, real_pipe = torch.nn.ModuleList.__init__, mg.grouped_engines, D.DequantPipeline

    def spy_init(self, *a, **k):
        built.append(1)
        init(self, *a, **k)

    def spy_pipe(*a, **k):
        pipes.append(real_pipe(*a, **k))
        return pipes[-1]

    monkeypatch.setattr(mg, "grouped_engines", lambda x: asked.append(1) or engines(x))
    monkeypatch.setattr(D, "DequantPipeline", spy_pipe)
    with torch.no_grad():
        monkeypatch.setattr(torch.nn.ModuleList, "__init__", spy_init)
        paired = block(x)
        monkeypatch.setattr(torch.nn.ModuleList, "__init__", init)
        monkeypatch.setenv(D.PAIR_ENV, "0")
        staged = block(x)
    assert not built
    assert len(asked) == 2 + 2  # eligibility (the dispatch) + once per grouped_chunks call, per forward
    p, s = pipes
    chunks = len(p.stages) // 2
    assert chunks > 4 and p.pair and not s.pair
    assert [t[1] for t in p.trace if t[0] == "launch"] == [(2 * c, 2 * c + 1) for c in range(chunks)]
    assert len([t for t in s.trace if t[0] == "launch"]) == 2 * chunks
    assert torch.equal(paired, staged)
    monkeypatch.setenv(mg.GROUPED_ENV, "0")
    with torch.no_grad():
        ref = block(x)
    assert float((paired.float() - ref.float()).abs().max()) <= 2**-7 * float(ref.float().abs().max())


@pytest.mark.parametrize("engine", ["linear", "dequant"])
def test_bench_grouped_candidate_outputs(engine: str, monkeypatch) -> None:
    """bench/int8.py's grouped row: each expert's output [1, n, out] made by one split per chunk where
    the rows lie back to back (linear), by slices where they are padded (dequant), equal to the
    chunk outputs sliced one by one; an expert without rows gets an empty [1, 0, out]."""
    import types

    sys.path.insert(0, str(ROOT / "bench"))
    import int8 as bench_int8

    from hunyuan_image3.hunyuan_loader.formats.w8a16 import Int8WeightOnlyLinear

    x0 = torch.zeros(1, 8, dtype=torch.bfloat16)
    if engine == "dequant" and not D.grouped_mm_available(x0):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    torch.manual_seed(0)
    ours = [(Int8WeightOnlyLinear.from_linear(torch.nn.Linear(16, 32, bias=False)),
             Int8WeightOnlyLinear.from_linear(torch.nn.Linear(16, 16, bias=False))) for _ in range(5)]
    counts = [3, 0, 4, 1, 2]
    xs = [torch.randn(1, c, 16).to(torch.bfloat16) for c in counts]
    monkeypatch.setattr(mg, "SCRATCH_BYTES", 2 * (32 * 16 + 16 * 16) * 2)  # 2 experts per chunk
    monkeypatch.setattr(mg, "_grouped_off", set())  # a failure here must not turn an engine off for later tests
    ys = bench_int8.grouped_candidate(ours, engine)(xs)
    x2 = torch.cat([x[0] for x in xs])
    ns = [types.SimpleNamespace(gate_and_up_proj=a, down_proj=b) for a, b in ours]
    ref = []
    with torch.no_grad():
        for lo, hi, _, y, rows in mg.grouped_chunks(ns, x2, torch.arange(x2.shape[0]), counts, engine):
            ref.extend(y[r:r + c] for r, c in zip(rows, counts[lo:hi]))
    assert len(ys) == 5
    for i, (y, r) in enumerate(zip(ys, ref)):
        assert y.shape == (1, counts[i], 16) and torch.equal(y[0], r), i


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer of a CUDA bench")
def test_moe_host_bench_without_cuda_says_so_and_exits_0() -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_host.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "needs a CUDA GPU" in out.stdout
