"""INT8 speed, error and memory on real-size HunyuanImage-3 layers, from ONE run (issue 14).

Part 1, the 64 routed experts of one layer (hidden 4096, width 3072, top-8, near-uniform
router) at the 1 MP and 2 MP CFG token counts, every path on the same bf16 weights, each expert
called with ``[1, n, hidden]`` as the gather/scatter dispatch calls it:
  bf16 | bitsandbytes LLM.int8 | W8A16 (a) plain torch, (b) torch.compile, (c) fused Triton
  kernel (the pack's default), (d) torchao int8 weight-only, (e) torch._weight_int8pack_mm
  | FP8 e4m3 weights + per-token e4m3 activations (fused quantization) via torch._scaled_mm.
Time (CUDA events, median), output error vs an fp32 reference on the same bf16 weights
(relative L2 and max), W8A16's error vs its own definition (fp32 on the dequantized
weights), expert weight bytes.
Part 2, the 10-layer step of bench/offload.py resident: bf16 vs bnb int8 vs W8A16 (experts
and attention) vs W8A16 experts + bnb attention; s/step, ratio, GPU memory per layer.

    python bench/int8.py [--tokens 8448,16640] [--layers 10] [--steps 3]
                         [--compile-mode max-autotune-no-cudagraphs|default|none] [--skip-step]

Needs CUDA (says so and exits 0 otherwise). torchao is used if importable. Asserts nothing.
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
    bnb_linear,
    make_layer,
    quantize_layer,
    start_bench,
    step_input,
    time_steps,
)

Lin = Callable[[torch.Tensor], torch.Tensor]


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


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


def run(pairs: list[tuple[Lin, Lin]], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [mlp(x, gu, dn) for x, (gu, dn) in zip(xs, pairs)]


def timed(pairs, xs, reps: int) -> tuple[float, list[torch.Tensor], float]:
    """(median seconds, outputs, seconds of the first call: compile/autotune included)."""
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
            try:
                return f(x)
            finally:
                os.environ.pop("HY3_W8A16_KERNEL", None)
                if old is not None:
                    os.environ["HY3_W8A16_KERNEL"] = old
        return call
    return [(wrap(a), wrap(b)) for a, b in pairs]


def module_bytes(mods) -> int:
    from hunyuan_image3.memory.residency.weights import module_weight_bytes

    return module_weight_bytes(mods)


def build_candidates(experts, compile_mode: str) -> tuple[dict, dict, list[str], list]:
    """name -> (gu, down) pairs, name -> expert weight bytes, notes on what was skipped, and
    the W8A16 modules (their dequantized weights define W8A16's own reference)."""
    from hunyuan_image3.hunyuan_loader.w8a16 import Int8WeightOnlyLinear

    cands: dict[str, list[tuple[Lin, Lin]]] = {}
    nbytes: dict[str, int] = {}
    notes: list[str] = []
    cands["bf16"] = [(e.gate_and_up_proj, e.down_proj) for e in experts]
    nbytes["bf16"] = module_bytes(experts)
    try:
        bnb_mods = [(bnb_linear(e.gate_and_up_proj, "int8"), bnb_linear(e.down_proj, "int8")) for e in experts]
        cands["bnb LLM.int8"] = bnb_mods
        nbytes["bnb LLM.int8"] = module_bytes([m for p in bnb_mods for m in p])
    except Exception as exc:  # noqa: BLE001
        notes.append(f"bnb LLM.int8 skipped: {type(exc).__name__}: {exc}")
    ours = [(Int8WeightOnlyLinear.from_linear(e.gate_and_up_proj), Int8WeightOnlyLinear.from_linear(e.down_proj))
            for e in experts]
    w8_bytes = module_bytes([m for p in ours for m in p])
    cands["W8A16 (a) plain torch"] = env_path(ours, "torch")
    cands["W8A16 (c) fused Triton [default]"] = env_path(ours, None)
    nbytes["W8A16 (a) plain torch"] = nbytes["W8A16 (c) fused Triton [default]"] = w8_bytes
    if compile_mode != "none":
        fn = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s.to(x.dtype), dynamic=True,
                           mode=None if compile_mode == "default" else compile_mode)

        def comp(m) -> Lin:
            return lambda x: fn(x, m.weight, m.weight_scale)
        cands[f"W8A16 (b) torch.compile {compile_mode}"] = [(comp(a), comp(b)) for a, b in ours]
        nbytes[f"W8A16 (b) torch.compile {compile_mode}"] = w8_bytes
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao = copy.deepcopy(experts)
        quantize_(ao, Int8WeightOnlyConfig())
        cands["W8A16 (d) torchao int8 weight-only"] = [(e.gate_and_up_proj, e.down_proj) for e in ao]
        nbytes["W8A16 (d) torchao int8 weight-only"] = sum(
            t.numel() * t.element_size() for e in ao for p in e.parameters()
            for t in ([getattr(p, n) for n in ("qdata", "scale", "int_data") if hasattr(p, n)] or [p]))
    except Exception as exc:  # noqa: BLE001 - not installed, or not this torch
        notes.append(f"torchao skipped: {type(exc).__name__}: {str(exc)[:160]}")
    if hasattr(torch, "_weight_int8pack_mm"):
        def pack(m) -> Lin:
            s = m.weight_scale.to(torch.bfloat16)

            def call(x):
                return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), m.weight, s).view(*x.shape[:-1], -1)
            return call
        try:
            probe = ours[0][0]
            pack(probe)(torch.zeros(1, 16, probe.in_features, device=probe.weight.device, dtype=torch.bfloat16))
            cands["W8A16 (e) torch._weight_int8pack_mm"] = [(pack(a), pack(b)) for a, b in ours]
            nbytes["W8A16 (e) torch._weight_int8pack_mm"] = w8_bytes
        except Exception as exc:  # noqa: BLE001 - no CUDA kernel in this build
            notes.append(f"torch._weight_int8pack_mm skipped: {type(exc).__name__}: {str(exc)[:120]}")
    try:
        from _fp8 import Fp8Linear

        if torch.cuda.get_device_capability() < (8, 9):
            raise RuntimeError("no FP8 tensor cores (compute capability < 8.9)")
        f8 = [(Fp8Linear(e.gate_and_up_proj), Fp8Linear(e.down_proj)) for e in experts]
        f8[0][0](torch.zeros(1, 16, H, device=experts[0].down_proj.weight.device, dtype=torch.bfloat16))
        cands["FP8 e4m3 w + per-token act (fused quant), _scaled_mm"] = f8
        nbytes["FP8 e4m3 w + per-token act (fused quant), _scaled_mm"] = sum(a.nbytes + b.nbytes for a, b in f8)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"FP8 skipped: {type(exc).__name__}: {str(exc)[:160]}")
    return cands, nbytes, notes, ours


def part1(dev, token_counts: list[int], reps: int, compile_mode: str) -> dict:
    layer = make_layer(dev, seed=0)
    experts = layer.mlp.experts
    cands, nbytes, notes, ours = build_candidates(experts, compile_mode)
    bf16_weights = [(e.gate_and_up_proj.weight, e.down_proj.weight) for e in experts]
    res: dict[str, dict[int, tuple]] = {name: {} for name in cands}
    own: dict[str, dict[int, float]] = {}
    first_call: dict[str, float] = {}
    for tokens in token_counts:
        xs = routed_inputs(layer, tokens, seed=tokens)
        ref = run(fp32_pairs(bf16_weights), xs)
        ref_q = run([(lambda x, m=a: F.linear(x.float(), m.dequantize(torch.float32)),  # one expert at a time
                      lambda x, m=b: F.linear(x.float(), m.dequantize(torch.float32))) for a, b in ours], xs)
        for name, pairs in cands.items():
            try:
                t, out, first = timed(pairs, xs, reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                notes.append(f"{name} at {tokens} tokens failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            first_call[name] = max(first_call.get(name, 0.0), first)
            res[name][tokens] = (t, *errors(out, ref))
            if name.startswith("W8A16") and "torchao" not in name:  # torchao quantizes its own way
                own.setdefault(name, {})[tokens] = errors(out, ref_q)[0]
            del out
        del xs, ref, ref_q
        _free()
    del cands, ours, layer, experts
    _free()
    from hunyuan_image3.hunyuan_loader import w8a16

    if not w8a16._kernel:
        notes.append("the fused Triton kernel was NOT used (unavailable or failed): (c) ran the plain torch path")
    return dict(res=res, nbytes=nbytes, notes=notes, own=own, first=first_call)


def print_part1(p: dict, token_counts: list[int]) -> None:
    res, nbytes = p["res"], p["nbytes"]
    base = res["bf16"]
    head = "| path | " + " | ".join(f"ms @{t} | vs bf16 | err L2 | err max" for t in token_counts)
    print("\n## 64 routed experts of one layer (same bf16 weights; error vs fp32 reference)\n")
    print(head + " | expert weights GB | first call s |")
    print("|---" * (2 + 4 * len(token_counts)) + "|---|")
    for name, by_t in res.items():
        cells = []
        for t in token_counts:
            if t in by_t and t in base:
                ms, l2, mx = by_t[t]
                cells.append(f"{ms * 1e3:.1f} | {ms / base[t][0]:.2f}x | {l2 * 100:.2f}% | {mx * 100:.2f}%")
            else:
                cells.append("- | - | - | -")
        print(f"| {name} | " + " | ".join(cells) + f" | {nbytes.get(name, 0) / GB:.2f} | {p['first'].get(name, 0):.1f} |")
    bf16_err = {t: base[t][1] for t in token_counts if t in base}
    print(f"\nW8A16 vs its own definition (fp32 matmuls on its dequantized weights), rel L2; "
          f"bf16 vs fp32 on its own weights for scale: {', '.join(f'{e * 100:.2f}%' for e in bf16_err.values())}")
    for name, by_t in p["own"].items():
        print(f"  {name}: " + ", ".join(f"{by_t[t] * 100:.2f}% @{t}" for t in token_counts if t in by_t))
    for n in p["notes"]:
        print("note:", n)
    # verdicts
    t0 = token_counts[0]
    w8 = {n: v[t0] for n, v in res.items() if n.startswith("W8A16") and t0 in v}
    if w8 and t0 in base:
        best = min(w8, key=lambda n: w8[n][0])
        print(f"\nfastest W8A16 at {t0}: {best}, {w8[best][0] / base[t0][0]:.2f}x bf16 (target <= 1.3x)")
        bnb = res.get("bnb LLM.int8", {}).get(t0)
        if bnb:
            ours = w8.get("W8A16 (c) fused Triton [default]", w8[best])
            print(f"default W8A16 error {ours[1] * 100:.2f}% vs bnb LLM.int8 {bnb[1] * 100:.2f}% "
                  f"({'<=' if ours[1] <= bnb[1] else 'ABOVE'} bnb); memory {nbytes.get('W8A16 (c) fused Triton [default]', 0) / max(1, nbytes.get('bnb LLM.int8', 1)):.3f}x bnb")
        fp8 = next((v[t0] for n, v in res.items() if n.startswith("FP8") and t0 in v), None)
        if fp8:
            faster = fp8[0] < w8[best][0]
            ok_err = bnb is None or fp8[1] <= bnb[1]
            print(f"FP8: {fp8[0] / base[t0][0]:.2f}x bf16, error {fp8[1] * 100:.2f}% -> "
                  f"{'worth a selectable format' if faster and ok_err else 'not adopted'} "
                  f"({'faster' if faster else 'slower'} than the fastest W8A16; error "
                  f"{'<=' if ok_err else 'above'} bnb's)")


def part2(dev, n: int, tokens: int, steps: int) -> None:
    x = step_input(dev, tokens)
    rows = {}
    for mode in ("bf16", "int8", "w8a16", "w8a16-experts"):
        _free()
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        layers = []
        for i in range(n):
            layer = make_layer(dev, seed=i)
            layers.append(layer if mode == "bf16" else quantize_layer(layer, mode))
            _free()
        model = Stack(layers, dev)
        build = time.perf_counter() - t0
        per_layer = (torch.cuda.memory_allocated(dev) - base) / n
        t, _, peak = time_steps(model, x, steps)
        rows[mode] = (t, per_layer, peak - base, build)
        del model, layers
        _free()
    names = {"bf16": "bf16 resident", "int8": "bnb LLM.int8 resident (experts + attention)",
             "w8a16": "W8A16 resident (experts + attention) [the INT8 loader's default]",
             "w8a16-experts": "W8A16 experts + bnb int8 attention"}
    t_bf = rows["bf16"][0]
    print(f"\n## {n}-layer step (bench/offload.py layers), {tokens} tokens, resident\n")
    print("| weights | s/step | vs bf16 | GPU GB per layer | peak GB | built in s |\n|---|---|---|---|---|---|")
    for mode, (t, per, peak, build) in rows.items():
        print(f"| {names[mode]} | {t:.3f} | {t / t_bf:.2f}x | {per / GB:.3f} | {peak / GB:.1f} | {build:.1f} |")
    if "int8" in rows:
        print(f"\nW8A16 per layer {rows['w8a16'][1] / max(1.0, rows['int8'][1]):.3f}x bnb int8's (target <= 1.03x); "
              f"step {rows['w8a16'][0] / t_bf:.2f}x bf16 (target <= 1.3x), {rows['int8'][0] / rows['w8a16'][0]:.1f}x "
              f"faster than bnb int8")
    print(f"projection, 32 layers all resident: W8A16 {32 * rows['w8a16'][0] / n:.2f} s/step, "
          f"bnb int8 {32 * rows['int8'][0] / n:.2f} s/step, bf16 {32 * t_bf / n:.2f} s/step")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8448,16640")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode for candidate (b): max-autotune-no-cudagraphs, default or none")
    ap.add_argument("--skip-step", action="store_true")
    args = ap.parse_args()
    if not start_bench("bench/int8.py"):
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    dev = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (W8A16 runs its plain torch path)")
    t0 = time.perf_counter()
    tokens = [int(t) for t in args.tokens.split(",")]
    p = part1(dev, tokens, args.reps, args.compile_mode)
    print_part1(p, tokens)
    if not args.skip_step:
        part2(dev, args.layers, tokens[0], args.steps)
    print(f"\nbench/int8.py ran in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
