"""INT8 speed, error and memory on real-size HunyuanImage-3 layers, from ONE run (issue 14).

Every figure is printed (line-buffered) as soon as it is measured: a run stopped early still
shows what it got. About 1-2 minutes on an H200 with the defaults (first Triton compiles
included; the slow candidates are opt-in).

Part 0, the W8A16 kernel configs one by one (``--skip-configs`` leaves it out): each forced on
one expert's gate_and_up_proj at 1,056 tokens (8,448 x top-8 / 64, the mean per expert at
1 MP), three runs: the compiled-code hazard check (``w8a16_kernel.hazard``), error vs fp32,
whether the runs are bit-identical, ms. The tuner never uses a config with a hazard; this
part shows whether such a config is also wrong on this GPU.

Part 1, the 64 routed experts of one layer (hidden 4096, width 3072, top-8, near-uniform
router) at the 1 MP and 2 MP CFG token counts, every path on the same bf16 weights, each expert
called with ``[1, n, hidden]`` as the gather/scatter dispatch calls it:
  bf16 | bitsandbytes LLM.int8 | W8A16 plain torch | W8A16 per-expert Triton kernel (one launch
  per expert Linear) | the grouped engines through the dispatch's own code, each forced
  (Triton grouped kernel; a chunk dequantized to a bf16 scratch + torch._grouped_mm; the same +
  per-expert cuBLAS; the last one is shown again with the dequantization of the next Linear
  overlapped on a side stream, HY3_MOE_OVERLAP=1, off by default) and the automatic choice (the
  pack's default; its first call times the engines and tunes) | FP8 e4m3 weights + per-token e4m3 activations via torch._scaled_mm (``--no-fp8`` leaves it out).
  Opt-in, slow to compile or to set up: ``--compile MODE`` (torch.compile of the plain W8A16
  expression; max-autotune takes minutes), ``--torchao`` (torchao int8 weight-only),
  ``--int8pack`` (torch._weight_int8pack_mm).
Time (CUDA events, median), output error vs an fp32 reference on the same bf16 weights
(relative L2 and max), W8A16's error vs its own definition (fp32 on the dequantized weights),
expert weight bytes; then the kernel's tuning (config per key, ms, what was left out and why).

Part 2, the 10-layer step of bench/offload.py resident, every layer through the loaders' MoE
dispatch (install_moe_dispatch): bf16 vs bnb int8 vs W8A16 (experts and attention; grouped, and
per-expert with HY3_MOE_GROUPED=0) (``--step-all`` adds W8A16 experts + bnb attention); s/step,
ratio, GPU bytes per layer counted from the layer's tensors (allocated delta as a cross-check).

    python bench/int8.py [--tokens 8448,16640] [--reps 7] [--layers 10] [--steps 3]
                         [--compile MODE] [--torchao] [--int8pack] [--no-fp8]
                         [--skip-configs] [--skip-step] [--step-all]

Needs CUDA (says so and exits 0 otherwise). Asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _synthetic import (
    GB,
    TOPK,
    E,
    H,
    Stack,
    W,
    bnb_linear,
    make_layer,
    quantize_layer,
    settings_refresh,
    start_bench,
    step_input,
    time_steps,
)

Lin = Callable[[torch.Tensor], torch.Tensor]
T0 = time.perf_counter()
GROUPED = "W8A16 grouped, engine chosen per shape [default]"
ENGINE_ROWS = {"triton": "W8A16 grouped Triton", "dequant": "W8A16 dequant + torch._grouped_mm",
               "linear": "W8A16 dequant + per-expert cuBLAS"}
OVERLAPPED = "W8A16 dequant + per-expert cuBLAS, overlapped (HY3_MOE_OVERLAP=1)"


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _elapsed() -> str:
    return f"[{time.perf_counter() - T0:.0f} s]"


def routed_inputs(layer, tokens: int, seed: int) -> list[torch.Tensor]:
    """Each expert's tokens ``[1, n, H]`` (top-8 of the layer's float32 router), in expert order."""
    dev = layer.mlp.gate.wg.weight.device
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        idx = layer.mlp.gate.wg(x.float()).softmax(-1).topk(TOPK, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    counts = torch.bincount(idx, minlength=E).tolist()
    return [c.unsqueeze(0) for c in x.index_select(0, order // TOPK).split(counts)]


def mlp(x: torch.Tensor, gu: Lin, down: Lin) -> torch.Tensor:
    """The expert MLP as the model code computes it: chunk(2, dim=2), first half * silu(second)."""
    a, b = gu(x).chunk(2, dim=2)
    return down(a * F.silu(b))


def run(pairs, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every expert's output; ``pairs`` is a list of (gate_and_up, down) per expert, or one
    callable taking all experts' inputs at once (the grouped kernel)."""
    with torch.no_grad():
        if callable(pairs):
            return pairs(xs)
        return [mlp(x, gu, dn) for x, (gu, dn) in zip(xs, pairs)]


def grouped_candidate(ours, engine: str | None = None,
                      overlap: bool | None = None) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """All experts through the dispatch's grouped code (moe_grouped.grouped_chunks: chunks of at
    most GROUPED_ROWS rows and SCRATCH_BYTES of dequantized weights, the dequantization overlapped
    with the GEMMs if ``overlap``; None: as HY3_MOE_OVERLAP says, off by default), from one
    [rows, H] tensor grouped by expert, as the dispatch holds its input (joined once, outside the
    timing; the gather of the rows stays inside it, which the bf16 row, fed each expert's rows,
    does not pay); ``engine`` forces one (None: the dispatch's automatic choice). The experts are
    an nn.ModuleList of modules, as the model holds them; each chunk's per-expert outputs
    ``[1, n, H]`` are made by one split where its rows lie back to back (as moe_dispatch._combine
    makes its views), not a slice and an unsqueeze per expert."""
    import itertools

    from torch import nn

    from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg

    class Expert(nn.Module):
        def __init__(self, gu: nn.Module, down: nn.Module) -> None:
            super().__init__()
            self.gate_and_up_proj, self.down_proj = gu, down

    experts = nn.ModuleList(Expert(a, b) for a, b in ours)
    joined: dict[int, tuple] = {}  # the dispatch gets one [tokens, H] tensor: joined once per input, not timed

    def whole(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        counts = [x.shape[1] for x in xs]
        if id(xs) not in joined:
            x2 = torch.cat([x[0] for x in xs])
            joined.clear()
            joined[id(xs)] = (xs, x2, torch.arange(x2.shape[0], device=x2.device))
        _, x2, tok = joined[id(xs)]  # (xs kept alive with its id)
        ys = []
        for lo, hi, _, y, rows in mg.grouped_chunks(experts, x2, tok, counts, engine, overlap=overlap):
            if y is None:
                raise RuntimeError("the grouped engine refused this input (see the log)")
            sub = counts[lo:hi]
            if all(r == a for r, a, n in zip(rows, itertools.accumulate(sub, initial=0), sub) if n):
                ys.extend(y[: sum(sub)].unsqueeze(0).split_with_sizes(sub, dim=1))
            else:  # padded rows (the torch._grouped_mm engine)
                ys.extend(y[r:r + c].unsqueeze(0) for r, c in zip(rows, sub))
        return ys
    return whole


def timed(pairs, xs, reps: int) -> tuple[float, list[torch.Tensor], float]:
    """(median seconds, outputs, seconds of the first call: compile/tuning included)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run(pairs, xs)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(pairs, xs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out, first


def errors(out: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(relative L2 error, max abs error / max abs reference) over all experts' outputs."""
    num = den = 0.0
    worst = peak = 0.0
    for y, r in zip(out, ref):
        d = y.float() - r
        num += float(d.pow(2).sum())
        den += float(r.pow(2).sum())
        worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
        peak = max(peak, float(r.abs().max()) if r.numel() else 0.0)
    return (num / den) ** 0.5, worst / peak


def fp32_pairs(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[Lin, Lin]]:
    """fp32 matmuls on the given weights (made fp32 per call: no 10 GB of fp32 copies)."""
    def lin(w: torch.Tensor) -> Lin:
        return lambda x: F.linear(x.float(), w.float())
    return [(lin(a), lin(b)) for a, b in weights]


def env_path(pairs, value: str | None):
    """Run ``pairs`` with HY3_W8A16_KERNEL set to ``value`` (None: the default, fused where available)."""
    def wrap(f: Lin) -> Lin:
        def call(x):
            old = os.environ.pop("HY3_W8A16_KERNEL", None)
            if value is not None:
                os.environ["HY3_W8A16_KERNEL"] = value
            settings_refresh()
            try:
                return f(x)
            finally:
                os.environ.pop("HY3_W8A16_KERNEL", None)
                if old is not None:
                    os.environ["HY3_W8A16_KERNEL"] = old
                settings_refresh()
        return call
    return [(wrap(a), wrap(b)) for a, b in pairs]


def module_bytes(mods) -> int:
    from hunyuan_image3.memory.residency.weights import module_weight_bytes

    return module_weight_bytes(mods)


# -- part 0: the kernel configs ------------------------------------------------------------------



def part0(dev, tokens: int = 1056) -> None:
    from hunyuan_image3.hunyuan_loader.formats.w8a16 import quantize_weight, torch_w8a16
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_kernel as K
    from hunyuan_image3.hunyuan_loader.kernels.cuda_timing import time_ms

    g = torch.Generator(device=dev).manual_seed(1)
    q, s = quantize_weight(torch.randn(2 * W, H, device=dev, generator=g) * 0.02)
    x = torch.randn(1, tokens, H, device=dev, generator=g).to(torch.bfloat16)
    x2 = x.reshape(-1, H)
    plain_ms = time_ms(lambda: torch_w8a16(x, q, s), dev)
    print(f"\n## W8A16 kernel configs, forced one by one: gate_and_up_proj (N {2 * W}, K {H}), {tokens} tokens, "
          f"bf16 {_elapsed()}\n")
    print(f"plain torch path (int8 -> bf16 copy + cuBLAS): {plain_ms:.3f} ms\n")
    print("| config | compiled-code hazard | error vs fp32 (of max) | 3 runs identical | ms | compile + first s |")
    print("|---|---|---|---|---|---|")
    for cfg in K.configs():
        t0 = time.perf_counter()
        try:
            why = K.config_hazard(cfg, x, q, s)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ys = [K.launch(x, q, s, config=cfg) for _ in range(3)]
            ms = time_ms(lambda c=cfg: K.launch(x, q, s, config=c), dev)
        except Exception as exc:  # noqa: BLE001 - out of shared memory on a smaller GPU, a compile error
            print(f"| {cfg} | failed: {type(exc).__name__}: {str(exc)[:100]} | - | - | - | - |")
            continue
        err = max(K.reference_error(y.reshape(-1, 2 * W), x2, q, s, None) for y in ys)
        same = all(torch.equal(ys[0], y) for y in ys[1:])
        verdict = "" if err <= 2**-7 and same else " WRONG"
        print(f"| {cfg} | {'yes (never tuned in)' if why else '-'} | {err * 100:.3f}%{verdict} | "
              f"{'yes' if same else 'NO'} | {ms:.3f} | {first:.1f} |")


# -- part 1: the routed experts of one layer -----------------------------------------------------
def build_candidates(experts, args) -> tuple[dict, dict, list]:
    """name -> (gu, down) pairs and name -> expert weight bytes, printing what is skipped; and
    the W8A16 modules (their dequantized weights define W8A16's own reference)."""
    from hunyuan_image3.hunyuan_loader.formats.w8a16 import Int8WeightOnlyLinear

    cands: dict[str, list[tuple[Lin, Lin]]] = {}
    nbytes: dict[str, int] = {}
    cands["bf16"] = [(e.gate_and_up_proj, e.down_proj) for e in experts]
    nbytes["bf16"] = module_bytes(experts)
    try:
        bnb_mods = [(bnb_linear(e.gate_and_up_proj, "int8"), bnb_linear(e.down_proj, "int8")) for e in experts]
        cands["bnb LLM.int8"] = bnb_mods
        nbytes["bnb LLM.int8"] = module_bytes([m for p in bnb_mods for m in p])
    except Exception as exc:  # noqa: BLE001
        print(f"note: bnb LLM.int8 skipped: {type(exc).__name__}: {exc}")
    ours = [(Int8WeightOnlyLinear.from_linear(e.gate_and_up_proj), Int8WeightOnlyLinear.from_linear(e.down_proj))
            for e in experts]
    w8_bytes = module_bytes([m for p in ours for m in p])
    cands["W8A16 plain torch"] = env_path(ours, "torch")
    cands["W8A16 per-expert Triton"] = env_path(ours, None)
    for engine, name in ENGINE_ROWS.items():
        cands[name] = grouped_candidate(ours, engine)
        nbytes[name] = w8_bytes
    cands[OVERLAPPED] = grouped_candidate(ours, "linear", overlap=True)  # what the overlap would save
    nbytes[OVERLAPPED] = w8_bytes
    cands[GROUPED] = grouped_candidate(ours)
    nbytes["W8A16 plain torch"] = nbytes["W8A16 per-expert Triton"] = nbytes[GROUPED] = w8_bytes
    if args.compile:
        fn = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s.to(x.dtype), dynamic=True,
                           mode=None if args.compile == "default" else args.compile)

        def comp(m) -> Lin:
            return lambda x: fn(x, m.weight, m.weight_scale)
        cands[f"W8A16 torch.compile {args.compile}"] = [(comp(a), comp(b)) for a, b in ours]
        nbytes[f"W8A16 torch.compile {args.compile}"] = w8_bytes
    if args.torchao:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            ao = copy.deepcopy(experts)
            quantize_(ao, Int8WeightOnlyConfig())
            cands["W8A16 torchao int8 weight-only"] = [(e.gate_and_up_proj, e.down_proj) for e in ao]
            nbytes["W8A16 torchao int8 weight-only"] = sum(
                t.numel() * t.element_size() for e in ao for p in e.parameters()
                for t in ([getattr(p, n) for n in ("qdata", "scale", "int_data") if hasattr(p, n)] or [p]))
        except Exception as exc:  # noqa: BLE001 - not installed, or not this torch
            print(f"note: torchao skipped: {type(exc).__name__}: {str(exc)[:160]}")
    if args.int8pack and hasattr(torch, "_weight_int8pack_mm"):
        def pack(m) -> Lin:
            s = m.weight_scale.to(torch.bfloat16)

            def call(x):
                return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), m.weight, s).view(*x.shape[:-1], -1)
            return call
        try:
            probe = ours[0][0]
            pack(probe)(torch.zeros(1, 16, probe.in_features, device=probe.weight.device, dtype=torch.bfloat16))
            cands["W8A16 torch._weight_int8pack_mm"] = [(pack(a), pack(b)) for a, b in ours]
            nbytes["W8A16 torch._weight_int8pack_mm"] = w8_bytes
        except Exception as exc:  # noqa: BLE001 - no CUDA kernel in this build
            print(f"note: torch._weight_int8pack_mm skipped: {type(exc).__name__}: {str(exc)[:120]}")
    if not args.no_fp8:
        try:
            from _fp8 import Fp8Linear

            if torch.cuda.get_device_capability() < (8, 9):
                raise RuntimeError("no FP8 tensor cores (compute capability < 8.9)")
            f8 = [(Fp8Linear(e.gate_and_up_proj), Fp8Linear(e.down_proj)) for e in experts]
            f8[0][0](torch.zeros(1, 16, H, device=experts[0].down_proj.weight.device, dtype=torch.bfloat16))
            cands["FP8 e4m3 w + per-token act, _scaled_mm"] = f8
            nbytes["FP8 e4m3 w + per-token act, _scaled_mm"] = sum(a.nbytes + b.nbytes for a, b in f8)
        except Exception as exc:  # noqa: BLE001
            print(f"note: FP8 skipped: {type(exc).__name__}: {str(exc)[:160]}")
    return cands, nbytes, ours


def _print_tuning_table(title: str, tunings: dict, key_label: str, none_text: str) -> None:
    """One tuner's choices: config and ms per key, the others timed, and what was left out and why."""
    print(f"\n{title} {_elapsed()}:")
    for key, t in tunings.items():
        chosen = f"{t.config} {t.timings[t.config]:.3f} ms" if t.config else none_text
        others = ", ".join(f"{c} {ms:.3f}" for c, ms in sorted(t.timings.items(), key=lambda kv: kv[1])
                           if c != t.config)
        print(f"- {key_label} {key[0]}, N {key[1]}, K {key[2]}: {chosen}; tuned in {t.seconds:.1f} s; "
              f"others (ms): {others or '-'}")
        for c, why in t.rejected.items():
            print(f"    left out {c}: {why}")


def print_tunings() -> None:
    from hunyuan_image3.hunyuan_loader.formats import w8a16

    if not w8a16._kernel:
        print("\nthe fused Triton kernel was NOT used (unavailable or failed): that row ran the plain torch path")
        return
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_grouped as G

    _print_tuning_table("grouped W8A16 kernel tuning so far", G.tunings(), "rows/expert bucket",
                        "none passed (per-expert path)")
    _print_tuning_table("W8A16 kernel tuning so far", w8a16._kernel.tunings(), "M bucket", "none passed (plain torch)")


def part1(dev, token_counts: list[int], args) -> None:
    from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg

    layer = make_layer(dev, seed=0)
    experts = layer.mlp.experts
    cands, nbytes, ours = build_candidates(experts, args)
    bf16_weights = [(e.gate_and_up_proj.weight, e.down_proj.weight) for e in experts]
    for i, tokens in enumerate(token_counts):
        xs = routed_inputs(layer, tokens, seed=tokens)
        per = [x.shape[1] for x in xs]
        ref = run(fp32_pairs(bf16_weights), xs)
        ref_q = run([(lambda x, m=a: F.linear(x.float(), m.dequantize(torch.float32)),  # one expert at a time
                      lambda x, m=b: F.linear(x.float(), m.dequantize(torch.float32))) for a, b in ours], xs)
        print(f"\n## 64 routed experts of one layer, {tokens} tokens (per expert {min(per)}..{max(per)}, "
              f"mean {sum(per) / len(per):.0f}); same bf16 weights, error vs fp32 {_elapsed()}\n")
        print("| path | ms | vs bf16 | err L2 | err max | err L2 vs own definition | expert weights GB | first call s |")
        print("|---|---|---|---|---|---|---|---|")
        res: dict[str, tuple] = {}
        for name, pairs in cands.items():
            try:
                t, out, first = timed(pairs, xs, args.reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:160]} | | | | | | |")
                continue
            l2, mx = errors(out, ref)
            own = f"{errors(out, ref_q)[0] * 100:.2f}%" if name.startswith("W8A16") and "torchao" not in name else "-"
            res[name] = (t, l2, mx)
            ratio = f"{t / res['bf16'][0]:.2f}x" if "bf16" in res else "-"
            print(f"| {name} | {t * 1e3:.1f} | {ratio} | {l2 * 100:.2f}% | {mx * 100:.2f}% | {own} | "
                  f"{nbytes.get(name, 0) / GB:.2f} | {first:.1f} |")
            del out
        del xs, ref, ref_q
        _free()
        if "bf16" in res and GROUPED in res:
            ours_t, ours_l2, _ = res[GROUPED]
            chosen = sorted({v for v in mg.engine_choices().values()}, key=str)
            line = (f"W8A16 default (engine {'/'.join(map(str, chosen))}) at {tokens}: "
                    f"{ours_t / res['bf16'][0]:.2f}x bf16 (target <= 1.3x)")
            if "W8A16 per-expert Triton" in res:
                line += f" (per-expert Triton {res['W8A16 per-expert Triton'][0] / res['bf16'][0]:.2f}x)"
            if "bnb LLM.int8" in res:
                bnb_t, bnb_l2, _ = res["bnb LLM.int8"]
                line += (f"; error {ours_l2 * 100:.2f}% vs bnb {bnb_l2 * 100:.2f}% "
                         f"({'<=' if ours_l2 <= bnb_l2 else 'ABOVE'} bnb); {bnb_t / ours_t:.1f}x faster than bnb; "
                         f"expert bytes {nbytes[GROUPED] / nbytes['bnb LLM.int8']:.3f}x bnb")
            print(line)
            if OVERLAPPED in res and ENGINE_ROWS["linear"] in res:
                seq, ovl = res[ENGINE_ROWS["linear"]][0], res[OVERLAPPED][0]
                print(f"dequant/GEMM overlap (engine linear): {seq * 1e3:.1f} -> {ovl * 1e3:.1f} ms "
                      f"({(seq - ovl) * 1e3:+.1f} ms saved)")
            fp8 = next((v for n, v in res.items() if n.startswith("FP8")), None)
            if fp8:
                print(f"FP8: {fp8[0] / res['bf16'][0]:.2f}x bf16, error {fp8[1] * 100:.2f}% "
                      f"({'faster' if fp8[0] < ours_t else 'slower'} than the W8A16 default)")
        if i == 0:
            print_tunings()
    del cands, ours, layer, experts
    _free()


# -- part 2: the N-layer step -----------------------------------------------------------------
STEP_NAMES = {"bf16": "bf16 resident", "int8": "bnb LLM.int8 resident (experts + attention)",
              "w8a16": "W8A16 resident (experts + attention) [the INT8 loader's default]",
              "w8a16-per-expert": "W8A16 resident, per-expert launches (HY3_MOE_GROUPED=0)",
              "w8a16-experts": "W8A16 experts + bnb int8 attention"}


def part2(dev, n: int, tokens: int, steps: int, modes: tuple[str, ...]) -> None:
    """The layers run through the loaders' MoE dispatch (install_moe_dispatch -> gather_scatter_forward).
    GPU GB per layer counts the layer's tensors (memory/residency/weights.py module_weight_bytes);
    the torch.cuda.memory_allocated delta from a clean base is printed beside it as a cross-check,
    with what was still allocated before the build and after the teardown."""
    from hunyuan_image3.hunyuan_loader.hooks import moe_dispatch as md
    from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg

    x = step_input(dev, tokens)
    print(f"\n## {n}-layer step (bench/offload.py layers, the loaders' MoE dispatch), {tokens} tokens, resident "
          f"{_elapsed()}\n")
    print("| weights | s/step | vs bf16 | GPU GB per layer (tensors) | allocated delta GB per layer | peak GB | "
          "built in s |\n|---|---|---|---|---|---|---|")
    rows = {}
    _free()
    clean = torch.cuda.memory_allocated(dev)
    for mode in modes:
        _free()
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        layers = []
        for i in range(n):
            layer = make_layer(dev, seed=i)
            layers.append(layer if mode == "bf16" else quantize_layer(layer, mode.removesuffix("-per-expert")))
            _free()
        model = Stack(layers, dev)
        md.install_moe_dispatch(model, "gather_scatter")
        build = time.perf_counter() - t0
        _free()
        per_layer = module_bytes([m for layer in layers for m in layer.modules()]) / n  # every submodule
        delta = (torch.cuda.memory_allocated(dev) - base) / n
        old = os.environ.pop(mg.GROUPED_ENV, None)
        if mode.endswith("-per-expert"):
            os.environ[mg.GROUPED_ENV] = "0"
        settings_refresh()
        try:
            t, _, peak = time_steps(model, x, steps)
        finally:
            os.environ.pop(mg.GROUPED_ENV, None)
            if old is not None:
                os.environ[mg.GROUPED_ENV] = old
            settings_refresh()
        rows[mode] = (t, per_layer)
        ratio = f"{t / rows['bf16'][0]:.2f}x" if "bf16" in rows else "-"
        print(f"| {STEP_NAMES[mode]} | {t:.3f} | {ratio} | {per_layer / GB:.3f} | {delta / GB:.3f} | "
              f"{(peak - base) / GB:.1f} | {build:.1f} |")
        del model, layers, layer, _
        _free()
        left = torch.cuda.memory_allocated(dev) - base
        if abs(left) > 1 << 20 or abs(base - clean) > 1 << 20:
            print(f"note: {mode}: {(base - clean) / GB:.3f} GB allocated above the clean base before the build, "
                  f"{left / GB:.3f} GB left after the teardown")
    if {"bf16", "int8", "w8a16"} <= set(rows):
        t_bf = rows["bf16"][0]
        print(f"\nW8A16 per layer {rows['w8a16'][1] / max(1.0, rows['int8'][1]):.3f}x bnb int8's (target <= 1.03x); "
              f"step {rows['w8a16'][0] / t_bf:.2f}x bf16 (target <= 1.3x), {rows['int8'][0] / rows['w8a16'][0]:.1f}x "
              f"faster than bnb int8")
        print(f"projection, 32 layers all resident: W8A16 {32 * rows['w8a16'][0] / n:.2f} s/step, "
              f"bnb int8 {32 * rows['int8'][0] / n:.2f} s/step, bf16 {32 * t_bf / n:.2f} s/step")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8448,16640")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", default="", metavar="MODE",
                    help="add torch.compile of the plain W8A16 expression (default | max-autotune-no-cudagraphs ...)")
    ap.add_argument("--torchao", action="store_true", help="add torchao int8 weight-only")
    ap.add_argument("--int8pack", action="store_true", help="add torch._weight_int8pack_mm")
    ap.add_argument("--no-fp8", action="store_true", help="leave out the FP8 candidate")
    ap.add_argument("--skip-configs", action="store_true", help="leave out part 0 (every kernel config forced)")
    ap.add_argument("--skip-step", action="store_true", help="leave out part 2 (the N-layer step)")
    ap.add_argument("--step-all", action="store_true", help="part 2 also with W8A16 experts + bnb attention")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # every line out as soon as it is printed
    if not start_bench("bench/int8.py"):
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    dev = torch.device("cuda", 0)
    try:
        import triton

        tri = f"triton {triton.__version__}"
    except ImportError:
        tri = "triton not installed (W8A16 runs its plain torch path)"
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {tri}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if not args.skip_configs and not tri.startswith("triton not"):
        part0(dev)
        _free()
    part1(dev, tokens, args)
    if not args.skip_step:
        modes = ("bf16", "int8", "w8a16", "w8a16-per-expert")
        modes += ("w8a16-experts",) if args.step_all else ()
        part2(dev, args.layers, tokens[0], args.steps, modes)
    print(f"\nbench/int8.py ran in {time.perf_counter() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
