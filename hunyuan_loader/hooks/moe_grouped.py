"""A layer's W8A16 experts run together (issue 14), for ``moe_dispatch.gather_scatter_forward``.

W8A16 experts (``grouped_w8a16_reason``) run in chunks of experts through one of the grouped
engines (``grouped_engines``: dequantize + per-expert cuBLAS; dequantize + ``torch._grouped_mm``;
the fused Triton grouped kernel). ``HY3_MOE_GROUPED`` = auto (default: on CUDA, ``auto_engine``, a
rule of the chunk's rows/expert bucket: the Triton kernel up to ``TRITON_MAX_BUCKET``, linear above;
never a timing, see ``auto_engine``) | triton | dequant | linear | 0 (per-expert calls). The
activation between the two Linears is one Triton pass (``moe_activation``).
``HY3_MOE_OVERLAP=1`` has the dequant engines overlap the dequantization with the GEMMs
(``w8a16_dequant.DequantPipeline``): on CUDA the next Linear's weights (the down_proj of this
chunk, then the gate_up of the next) are dequantized on a side stream into a second buffer while
this one's GEMMs run; bit-identical to the sequential order, which is the default (measured slower
overlapped on the H200: see w8a16_dequant.OVERLAP_ENV).

Memory bound of the grouped path, on top of the per-expert path's: a chunk has at most
``GROUPED_ROWS`` rows (gathered input, gate_up output, activation, output: 16384 x
(4096 + 6144 + 3072 + 4096) x 2 B = ~0.57 GB on the real config) and the dequant engines' two
buffers together hold at most ``scratch_bytes()`` (``HY3_MOE_SCRATCH_MB``, default 512 MiB: 7
experts' bf16 gate_up + down, 504 MiB; 1024: 14 experts, half the chunks and so half the launches
per chunk; the same chunks with and without overlap) — ~1.1 GB in all at the default; the
activations are freed after each chunk, the buffers at the end of the layer's MoE call (the
caching allocator keeps them reserved). The run estimate (per_run.inference_bytes, the card
plan) adds it through ``workspace_bytes``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch import nn

from ..core import settings
from ..kernels.moe_activation import silu_mul

logger = logging.getLogger(__name__)

GROUPED_ENV = settings.MOE_GROUPED  # auto (default) | triton | dequant | linear | off/0 (every expert on its own)
GROUPED_ROWS = 16384  # rows (token x expert assignments) per grouped chunk: bounds the activations
SCRATCH_BYTES = 512 * 2**20  # both buffers of dequantized bf16 weights (gate_up + down of one chunk), by default
SCRATCH_ENV = settings.MOE_SCRATCH_MB  # MiB for those buffers instead of SCRATCH_BYTES (e.g. 1024: 14 experts per chunk)
ENGINES = ("linear", "dequant", "triton")  # what HY3_MOE_GROUPED can name; auto: ``auto_engine``
AUTO_ORDER = ("linear", "triton", "dequant")  # auto above TRITON_MAX_BUCKET: the first of these available
TRITON_MAX_BUCKET = 512  # rows/expert buckets up to this run the Triton engine in auto (see auto_engine)
_grouped_off: set[str] = set()  # engines that failed for a reason other than their input
_chosen: dict[tuple, str | None] = {}  # auto's engine per (rows/expert bucket, shapes, dtype, device), as used


def grouped_mode() -> str:
    """``HY3_MOE_GROUPED``: "auto", "off", or one engine name."""
    return settings.get(GROUPED_ENV)


def scratch_bytes() -> int:
    """Bytes for the dequant engines' two buffers: ``HY3_MOE_SCRATCH_MB`` MiB (a positive whole
    number) if set, else ``SCRATCH_BYTES`` (512 MiB)."""
    mb = settings.get(SCRATCH_ENV)
    return SCRATCH_BYTES if mb is None else mb * 2**20


def grouped_engines(x: torch.Tensor) -> list[str]:
    """Engines that can run ``x`` now, in ``ENGINES`` order (``auto`` picks one: ``auto_engine``).

    triton: the fused grouped kernel (``w8a16_grouped``; CUDA, Triton). dequant: the chunk's
    weights dequantized into a bf16 scratch, then ``torch._grouped_mm`` (``w8a16_dequant``).
    linear: the same scratch, one cuBLAS matmul per expert. In ``auto`` the dequant engines
    are offered on CUDA only (CPU keeps the per-expert plain path); a forced engine runs anywhere
    it works (CPU tests)."""
    from ..formats import w8a16
    from ..kernels import w8a16_dequant

    mode = grouped_mode()
    if mode == "off" or x.dtype not in (torch.bfloat16, torch.float16):
        return []
    wanted = ENGINES if mode == "auto" else (mode,)
    out = []
    for name in wanted:
        if name in _grouped_off:
            continue
        if name == "triton":
            ok = w8a16.fused_available(x)
        elif mode == "auto" and not x.is_cuda:
            ok = False
        elif name == "dequant":
            ok = w8a16_dequant.grouped_mm_available(x)
        else:
            ok = True
        if ok:
            out.append(name)
    return out


def _silu_act(act: Any) -> bool:
    """``act_fn`` is a SiLU module: transformers' ACT2FN["silu"] (SiLUActivation in 4.57, nn.SiLU in others)."""
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _hooked(m: nn.Module) -> bool:
    d = m.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or "forward" in d or d.get("_hf_hook") is not None)


def grouped_w8a16_reason(experts: nn.ModuleList, x: torch.Tensor) -> str | None:
    """Why the experts of a block can NOT run through a grouped engine (None: they can).

    The grouped path computes what the official expert does for ``hidden_act == "silu"``
    (HunyuanMLP.forward, hunyuan_image_3/hunyuan.py:1014-1019: ``x1, x2 =
    gate_and_up_proj(x).chunk(2, dim=2); down_proj(x1 * act_fn(x2))``), so it is used only
    when every expert is exactly that: ``hidden_act`` "silu", SiLU activation, both Linears
    ``Int8WeightOnlyLinear`` without bias, no hooks or patched forwards on the expert or its
    Linears; with an engine available (``grouped_engines``) and ``HY3_MOE_GROUPED`` not "0".
    """
    if grouped_mode() == "off":
        return f"{GROUPED_ENV}=0"
    if not len(experts):
        return "no experts"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks"
    from ..formats import w8a16

    linear = w8a16.Int8WeightOnlyLinear
    for e in experts:  # runs every MoE call: plain reads, no Module.__getattr__ (~1 us per expert)
        mods = e._modules
        if getattr(e, "hidden_act", None) != "silu" or not _silu_act(mods.get("act_fn")):  # instance or class
            return "an expert is not a SiLU-gated MLP (hidden_act 'silu')"
        gu, down = mods.get("gate_and_up_proj"), mods.get("down_proj")
        if (type(gu) is not linear or type(down) is not linear or gu._parameters.get("bias") is not None
                or down._parameters.get("bias") is not None):
            return "an expert Linear is not an Int8WeightOnlyLinear without bias"
        if _hooked(e) or _hooked(gu) or _hooked(down):
            return "hooks on an expert module"
        if gu.out_features != 2 * down.in_features:
            return "gate_and_up_proj is not twice down_proj's input width"
    if not grouped_engines(x):
        return "no grouped engine: the fused W8A16 kernel is not available for this input"
    return None


def scratch_experts(experts: Any) -> int:
    """Experts per chunk whose dequantized weights, gate_up and down together (the two buffers of
    ``DequantPipeline``), fit ``scratch_bytes()``: 7 on the real config at the default 512 MiB."""
    from ..kernels.w8a16_dequant import experts_per_chunk

    gu, dn = _linears(experts[0])
    return experts_per_chunk([tuple(_param(gu, "weight").shape), tuple(_param(dn, "weight").shape)], scratch_bytes())


def _expert_chunks(counts: list[int], max_experts: int | None = None) -> list[tuple[int, int]]:
    """Expert ranges [lo, hi) of at most GROUPED_ROWS rows (an expert with more is alone) and at
    most ``max_experts`` experts with rows each."""
    chunks, lo, rows, busy = [], 0, 0, 0
    for e, n in enumerate(counts):
        if rows and (rows + n > GROUPED_ROWS or (n and max_experts is not None and busy >= max_experts)):
            chunks.append((lo, e))
            lo, rows, busy = e, 0, 0
        rows += n
        busy += bool(n)
    chunks.append((lo, len(counts)))
    return chunks


DEQUANT_ENGINES = ("dequant", "linear")  # the engines that read a DequantPipeline


def _busy(sub: list[int]) -> list[int]:
    return [i for i, c in enumerate(sub) if c]


def _linears(e: Any) -> tuple[Any, Any]:
    """An expert's (gate_and_up_proj, down_proj): a plain dict read for a Module (the model's
    experts), attributes for anything else (the benches' namespaces)."""
    mods = getattr(e, "_modules", None)
    if mods is not None and "gate_and_up_proj" in mods and "down_proj" in mods:
        return mods["gate_and_up_proj"], mods["down_proj"]
    return e.gate_and_up_proj, e.down_proj


def _param(m: Any, name: str) -> torch.Tensor:
    p = m.__dict__.get("_parameters")
    t = p.get(name) if p is not None else None
    return t if t is not None else getattr(m, name)


def dequant_stages(ex: Any, sub: list[int]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The two dequantization stages of one chunk (gate_up, then down) over its experts with rows
    (``_modules`` / ``_parameters`` read directly: ~40 Module attribute lookups per chunk otherwise)."""
    pairs = [_linears(ex[i]) for i, c in enumerate(sub) if c]
    gu = [p[0] for p in pairs]
    dn = [p[1] for p in pairs]
    return [([_param(m, "weight") for m in gu], [_param(m, "weight_scale") for m in gu]),
            ([_param(m, "weight") for m in dn], [_param(m, "weight_scale") for m in dn])]


def _engine_rows(engine: str, ex: Any, x: torch.Tensor, idx: torch.Tensor, sub: list[int],
                 pipe: Any = None, stage: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(outputs, first output row per expert) of experts ``ex`` on the rows ``x[idx]`` (grouped by
    expert, ``sub`` rows each) through ``engine``. The dequant engines read their weights from
    ``pipe`` (a ``DequantPipeline``; stages ``stage`` and ``stage + 1`` are this chunk's), else
    from a pipeline of their own for this chunk."""
    from ..kernels import w8a16_dequant as D

    if engine == "triton":
        from ..kernels import w8a16_grouped as G  # imports Triton: only this engine needs it

        xs = x.index_select(0, idx)
        h = G.grouped_linear(xs, [e.gate_and_up_proj.weight for e in ex],
                             [e.gate_and_up_proj.weight_scale for e in ex], sub)
        del xs
        act = silu_mul(h)  # the official order: first half times silu(second half)
        del h
        y = G.grouped_linear(act, [e.down_proj.weight for e in ex], [e.down_proj.weight_scale for e in ex], sub)
        starts = [0]
        for c in sub[:-1]:
            starts.append(starts[-1] + c)
        return y, starts
    own = pipe is None
    if own:
        pipe, stage = D.DequantPipeline(dequant_stages(ex, sub), x.dtype, x.device), 0
    try:
        busy = _busy(sub)
        cb = [sub[i] for i in busy]
        if engine == "dequant":
            pos, sb = D.gather_index(cb)
            pinned = pos.pin_memory() if idx.is_cuda else pos
            src = idx.index_select(0, pinned.to(idx.device, non_blocking=True))
            xs = x.index_select(0, src)
            h = D.gemm_rows(xs, pipe.acquire(stage), cb, gemm="grouped_mm", starts=sb)
            pipe.release(stage)
            del xs
            act = silu_mul(h)
            del h
            y = D.gemm_rows(act, pipe.acquire(stage + 1), cb, gemm="grouped_mm", starts=sb)
        else:  # linear: the rows back to back; the per-expert transposed views made once per pipeline
            sb = list(itertools.accumulate(cb[:-1], initial=0))
            xs = x.index_select(0, idx)
            w = pipe.acquire(stage)
            h = D.gemm_rows(xs, w, cb, gemm="linear", starts=sb, wt=pipe.transposed(stage), packed=True)
            pipe.release(stage)
            del xs
            act = silu_mul(h)
            del h
            w = pipe.acquire(stage + 1)
            y = D.gemm_rows(act, w, cb, gemm="linear", starts=sb, wt=pipe.transposed(stage + 1), packed=True)
        pipe.release(stage + 1)
        del act
    finally:
        if own:
            pipe.close()
    starts = [0] * len(sub)
    for i, s0 in zip(busy, sb):
        starts[i] = s0
    return y, starts



def key_base(ex: Any, x: torch.Tensor) -> tuple:
    """The part of ``engine_key`` that is the same for every chunk of one MoE call (shapes, dtype, device)."""
    e, dev = ex[0], x.device
    return (tuple(e.gate_and_up_proj.weight.shape), tuple(e.down_proj.weight.shape), x.dtype, dev.type, dev.index)


def engine_key(ex: Any, x: torch.Tensor, sub: list[int], base: tuple | None = None) -> tuple:
    """(rows/expert bucket, shapes, dtype, device): what an automatic engine choice is kept for; ``base``
    is ``key_base(ex, x)`` made once per call (the planning of a call's chunks runs before its first
    kernel, so its host time is GPU idle time: ~0.5 ms per MoE call on the H200's host at 10 chunks)."""
    from ..formats.w8a16 import m_bucket

    busy = sum(1 for c in sub if c) or 1
    return (m_bucket(sum(sub) // busy), *(base if base is not None else key_base(ex, x)))


def auto_engine(names: list[str], bucket: int) -> str | None:
    """The engine ``auto`` runs a chunk on, among ``names`` (``grouped_engines``, in ``ENGINES``
    order), for a chunk of ``bucket`` rows per expert (``m_bucket``): the Triton engine up to
    ``TRITON_MAX_BUCKET`` rows/expert, else the first of ``AUTO_ORDER`` available (linear).

    A rule of the shape alone, never a timing (issue 21): the engines round differently (the Triton
    kernel scales the fp32 accumulator; linear and dequant round the dequantized weight to bf16
    first, and their GEMMs are different cuBLAS / CUTLASS kernels), so an engine picked by a timing
    on the first call could give the first image after a start, a later one and another process
    different bits. The rule follows the bytes and the GEMM speed: the Triton engine reads each int8
    weight once where linear reads 1, writes 2 and reads 2 bytes per weight (~30 us per real-size
    expert on the H200, measured: 1.9 ms for 64; ~45 us on an H100, estimated from its bandwidth),
    and its GEMM is ~25-30% slower than cuBLAS's (~0.10 us per row per expert on the H200: 6.5 ms for
    64 experts at 1,056 rows). By that estimate linear wins from roughly 900 (H200) to 1,300 (H100)
    rows per expert and the Triton engine below: buckets up to 512 take Triton, from 1,024 (1 MP is
    1,056 rows per expert, where the former timing picked linear on the H200 in every run) linear.
    ``python bench/int8.py --tokens ...`` with ``HY3_MOE_GROUPED`` forced to each engine measures the
    two sides on a machine."""
    if not names:
        return None
    if "triton" in names and bucket <= TRITON_MAX_BUCKET:
        return "triton"
    return next((n for n in AUTO_ORDER if n in names), names[0])


def _select_engine(names: list[str], ex: Any, x: torch.Tensor, sub: list[int],
                   base: tuple | None = None) -> str | None:
    """The engine for this chunk: the only one offered (a forced engine, or the only one here), or
    ``auto_engine`` of the chunk's rows/expert bucket (recorded in ``engine_choices``)."""
    if len(names) == 1:
        return names[0]  # nothing to choose: no key to make
    key = engine_key(ex, x, sub, base)
    name = auto_engine(names, key[0])
    if _chosen.get(key, "") != name:
        logger.info("grouped MoE engine for rows/expert bucket %d, %s x %s: %s (of %s)",
                    key[0], key[1], key[2], name, ", ".join(names))
        _chosen[key] = name
    return name


def engine_choices() -> dict[tuple, str | None]:
    """Every automatic engine choice made in this process (key -> engine): benches and tests."""
    return dict(_chosen)


def _chunk_engine(experts: Any, x: torch.Tensor, sub: list[int], engine: str | None,
                  names: list[str] | None = None, base: tuple | None = None) -> str | None:
    """The engine for one chunk (``engine`` forces one; None: the chunk has no rows or no engine);
    ``names``: ``grouped_engines(x)`` and ``base``: ``key_base`` if the caller has them."""
    if sum(sub) == 0:
        return None
    if names is None:
        names = [engine] if engine is not None else grouped_engines(x)
    name = _select_engine(names, experts, x, sub, base) if names else None
    return None if name is None or (engine is None and name in _grouped_off) else name


def _run_chunk(name: str, ex: Any, x: torch.Tensor, idx: torch.Tensor, sub: list[int], pipe: Any,
               stage: int) -> tuple[torch.Tensor, list[int]] | None:
    from ..formats.w8a16 import Unsupported

    try:
        return _engine_rows(name, ex, x, idx, sub, pipe, stage)
    except torch.OutOfMemoryError:
        raise
    except Unsupported as exc:
        logger.debug("grouped W8A16 (%s): %s; per-expert path for these experts", name, exc)
    except Exception as exc:  # noqa: BLE001 - a compile/launch failure: keep working, say so once
        logger.warning("grouped MoE engine %s failed (%s: %s); not used from now on", name, type(exc).__name__, exc)
        _grouped_off.add(name)
    return None


def grouped_chunks(experts: Any, x: torch.Tensor, tok: torch.Tensor, counts: list[int],
                   engine: str | None = None, *, overlap: bool | None = None) -> Any:
    """Yield ``(lo, hi, start, outputs, first row per expert)`` for each chunk of experts
    (``_expert_chunks``: at most ``GROUPED_ROWS`` rows and ``scratch_experts`` experts with rows);
    outputs None where no grouped engine took the chunk (the caller runs those experts one by one).
    ``tok[start:]`` are the chunk's rows of ``x``, grouped by expert.

    Each chunk's engine is chosen first (``engine`` forces one); the chunks on a dequant engine
    share one ``DequantPipeline``, so on CUDA the next Linear's weights are dequantized on a side
    stream while this one's GEMMs run (``overlap``: None follows ``HY3_MOE_OVERLAP``, off by default)."""
    from ..kernels import w8a16_dequant as D

    D.dequant_kernel_variant()  # a bad HY3_DEQUANT_KERNEL is the caller's error, not an engine failure to log and drop
    experts = list(experts)  # a ModuleList's slice builds a new ModuleList (~7 add_module calls) per chunk
    names = [engine] if engine is not None else grouped_engines(x)  # the same for every chunk of this call
    base = key_base(experts, x) if len(names) > 1 else None  # the same for every chunk of this call
    chunks, start, plan = _expert_chunks(counts, scratch_experts(experts)), 0, []
    for lo, hi in chunks:
        sub = counts[lo:hi]
        n = sum(sub)
        idx = tok[start : start + n]
        plan.append((lo, hi, start, sub, idx, _chunk_engine(experts[lo:hi], x, sub, engine, names, base)))
        start += n
    stages, first = [], {}
    for lo, hi, _, sub, _, name in plan:
        if name in DEQUANT_ENGINES:
            first[lo] = len(stages)
            stages.extend(dequant_stages(experts[lo:hi], sub))
    pipe = D.DequantPipeline(stages, x.dtype, x.device, overlap=overlap) if stages else None
    try:
        for lo, hi, start, sub, idx, name in plan:
            got = None
            if name is not None and (name not in _grouped_off or engine is not None):
                got = _run_chunk(name, experts[lo:hi], x, idx, sub, pipe, first.get(lo, 0))
            ys, rows = got if got is not None else (None, None)
            del got
            yield lo, hi, start, ys, rows
            del ys
    finally:
        if pipe is not None:
            pipe.close()


def workspace_bytes(model: nn.Module) -> int:
    """GPU bytes the grouped path may hold on top of the per-expert path during one MoE call (0 when
    the model's experts are not W8A16 SiLU MLPs, or ``HY3_MOE_GROUPED=0``): a chunk's activations
    (``GROUPED_ROWS`` rows of gathered input, gate_up output, activation and output) and the
    dequant engines' scratch (``scratch_bytes()``). For the run estimate (per_run.inference_bytes)."""
    from ..formats import w8a16
    from ..model.topology import find_moe_blocks

    if grouped_mode() == "off":
        return 0
    blocks = find_moe_blocks(model)
    experts = getattr(blocks[0], "experts", None) if blocks else None
    if not experts:
        return 0
    e = experts[0]
    gu, down = e._modules.get("gate_and_up_proj"), e._modules.get("down_proj")
    if (type(gu) is not w8a16.Int8WeightOnlyLinear or type(down) is not w8a16.Int8WeightOnlyLinear
            or getattr(e, "hidden_act", None) != "silu"):
        return 0
    return workspace_bytes_for(down.out_features, down.in_features)


def workspace_bytes_for(hidden: int, inter: int) -> int:
    """``workspace_bytes`` for experts of ``hidden`` -> ``inter`` (bf16 activations): ~1.1 GB on the
    real config (16384 x (2 x 4096 + 3 x 3072) x 2 B + 512 MiB at the default ``HY3_MOE_SCRATCH_MB``)."""
    return GROUPED_ROWS * (2 * hidden + 3 * inter) * 2 + scratch_bytes()
