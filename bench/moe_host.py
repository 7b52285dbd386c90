"""Host overhead of the grouped W8A16 MoE path (issue 14): where the time of one layer's experts goes.

The 64 routed experts of bench/int8.py part 1's layer (hidden 4096, width 3072, top-8, same bf16
weights) at 8,448 tokens (the 1 MP CFG count) through ``moe_grouped.grouped_chunks``, engine
linear (bench/int8.py's ``grouped_candidate``: experts in an nn.ModuleList as the model holds them),
for each dequantization scratch (``HY3_MOE_SCRATCH_MB`` 512, the default: 7 experts per chunk;
1024: 14) x dequantization launches (``HY3_MOE_PAIR_DEQUANT=0``: one per Linear, as before;
``1``, the default: one per chunk for both Linears); the other host-side changes of this round
(cached views and tables, no ModuleList slicing, the engine list once per call) have no switch
and are in every row. Then bf16's per-expert loop on the same weights. Per row, medians of
``--reps`` calls after two warm-up calls:

  wall ms: CUDA events around one call that starts on an idle GPU (host and GPU both count);
  host ms: ``perf_counter`` around the same call, without synchronising: the time to issue it;
  GPU ms: the call's kernels alone: issued behind a ``torch.cuda._sleep`` long enough that the host
           has issued everything before the GPU reaches them (checked: the start event must still
           be pending when the call returns; a row says so when it was not).

W8A16 rows are also checked bit for bit against the first W8A16 row (the same kernels on the same
inputs: chunking and launch grouping must not change a bit). Each line is printed as soon as it is
measured.

    python bench/moe_host.py [--tokens 8448] [--reps 15] [--scratch 512,1024]

Needs CUDA (says so and exits 0 otherwise). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _synthetic import make_layer, settings_refresh, start_bench


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def sleep_cycles_per_ms() -> float:
    """Clock cycles of ``torch.cuda._sleep`` per ms on this GPU (its clock under a spin)."""
    torch.cuda._sleep(10**6)  # wake the clocks
    a, b = _events()
    cycles = 2 * 10**7
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    torch.cuda.synchronize()
    return cycles / max(a.elapsed_time(b), 1e-3)


def measure(fn: Callable[[], object], reps: int, cycles_per_ms: float) -> tuple[float, float, float, bool, object]:
    """(wall ms, host ms, GPU ms, whether the sleep covered the host's issue in every GPU rep, the
    last output) of ``fn``, medians of ``reps`` after two warm-up calls."""
    out = fn()
    out = fn()
    torch.cuda.synchronize()
    wall, host = [], []
    for _ in range(reps):
        del out
        torch.cuda.synchronize()
        a, b = _events()
        a.record()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        b.record()
        torch.cuda.synchronize()
        wall.append(a.elapsed_time(b))
        host.append((t1 - t0) * 1e3)
    cycles = int((2 * max(host) + 5.0) * cycles_per_ms)
    gpu, covered = [], True
    for _ in range(reps):
        del out
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        a, b = _events()
        a.record()
        out = fn()
        covered &= not a.query()  # still asleep: every kernel of the call was queued before the GPU got to it
        b.record()
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b))
    return statistics.median(wall), statistics.median(host), statistics.median(gpu), covered, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8448)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--scratch", default="512,1024", help="HY3_MOE_SCRATCH_MB values to measure")
    ap.add_argument("--kernels", default="flat,rows", help="HY3_DEQUANT_KERNEL values to measure")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if not start_bench("bench/moe_host.py"):
        return 0
    from int8 import grouped_candidate, routed_inputs, run

    from hunyuan_image3.hunyuan_loader.formats.w8a16 import Int8WeightOnlyLinear
    from hunyuan_image3.hunyuan_loader.hooks import moe_grouped as mg
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D

    dev = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    layer = make_layer(dev, seed=0)
    experts = layer.mlp.experts
    xs = routed_inputs(layer, args.tokens, seed=args.tokens)
    per = [x.shape[1] for x in xs]
    print(f"64 routed experts, {args.tokens} tokens (rows per expert {min(per)}..{max(per)}), engine linear; "
          f"medians of {args.reps}")
    ours = [(Int8WeightOnlyLinear.from_linear(e.gate_and_up_proj), Int8WeightOnlyLinear.from_linear(e.down_proj))
            for e in experts]
    bf16 = [(e.gate_and_up_proj, e.down_proj) for e in experts]
    cpm = sleep_cycles_per_ms()
    print("| path | wall ms | host ms | GPU ms | wall vs bf16 | host vs bf16 | bits vs first W8A16 row |")
    print("|---|---|---|---|---|---|---|")
    bw, bh, bg, bcov, out = measure(lambda: run(bf16, xs), args.reps, cpm)
    del out
    note = "" if bcov else " (sleep did not cover the issue: GPU ms includes host time)"
    print(f"| bf16 per-expert loop | {bw:.2f} | {bh:.2f} | {bg:.2f}{note} | 1.00x | 1.00x | - |")
    saved = {k: os.environ.get(k) for k in (mg.SCRATCH_ENV, D.PAIR_ENV, D.KERNEL_ENV)}
    kernels = args.kernels.split(",")
    ref = None
    try:
        dequant_alone(ours, kernels, args.reps)
        for mb, pair, kern in [(int(m), p, k) for m in args.scratch.split(",") for p in ("0", "1") for k in kernels]:
            os.environ[mg.SCRATCH_ENV], os.environ[D.PAIR_ENV], os.environ[D.KERNEL_ENV] = str(mb), pair, kern
            settings_refresh()
            fn = grouped_candidate(ours, "linear", overlap=False)
            e = mg.scratch_experts(_namespaces(ours[:1]))
            chunks = len(mg._expert_chunks(per, e))
            launches = chunks * (1 if pair == "1" else 2)
            try:
                w, h, g, cov, out = measure(lambda f=fn: run(f, xs), args.reps, cpm)
            except torch.OutOfMemoryError as exc:
                print(f"| scratch {mb} MiB, pair {pair}, {kern} | out of memory: {str(exc)[:80]} | | | | | |")
                torch.cuda.empty_cache()
                continue
            if ref is None:
                ref, same = out, "first"
            else:
                same = "identical" if all(torch.equal(a, b) for a, b in zip(out, ref)) else "DIFFERENT"
            del out
            note = "" if cov else " (sleep did not cover the issue)"
            print(f"| W8A16 linear, scratch {mb} MiB ({e} experts/chunk, {chunks} chunks), "
                  f"{'one dequant launch per chunk' if pair == '1' else 'one dequant launch per Linear'} "
                  f"({launches} + {chunks} SiLU launches), {kern} kernel | {w:.2f} | {h:.2f} | {g:.2f}{note} | "
                  f"{w / bw:.2f}x | {h / bh:.2f}x | {same} |")
            torch.cuda.empty_cache()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        settings_refresh()
    return 0


def dequant_alone(ours, kernels: list[str], reps: int) -> None:
    """The dequantization of the whole layer (64 experts' gate_up and down, one launch) per kernel variant:
    GPU ms (CUDA events, median) and the rate in bytes moved (1 read + 2 written per weight)."""
    from hunyuan_image3.hunyuan_loader.kernels import w8a16_dequant as D

    gu = ([a.weight for a, _ in ours], [a.weight_scale for a, _ in ours])
    dn = ([b.weight for _, b in ours], [b.weight_scale for _, b in ours])
    n_gu = len(gu[0]) * gu[0][0].numel()
    off = -(-n_gu // D.OUT_ALIGN) * D.OUT_ALIGN
    total = n_gu + len(dn[0]) * dn[0][0].numel()
    out = torch.empty(off + total - n_gu, dtype=torch.bfloat16, device=gu[0][0].device)
    groups = [(*gu, 0), (*dn, off)]
    table = D.kernel_table(groups, out.device)
    ref = None
    for kern in kernels:
        os.environ[D.KERNEL_ENV] = kern
        settings_refresh()
        times = []
        for _ in range(reps + 2):
            a, b = _events()
            a.record()
            D.dequantize_groups(groups, out, use_triton=True, table=table)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        ms = statistics.median(times[2:])
        same = "first" if ref is None else ("identical" if torch.equal(out, ref) else "DIFFERENT")
        ref = out.clone() if ref is None else ref
        print(f"dequantization alone, {kern} kernel: 64 experts gate_up + down ({total / 1e9:.2f} G weights) in "
              f"{ms:.3f} ms = {3 * total / ms / 1e9:.2f} TB/s (1 B read + 2 B written per weight); bits {same}")
    del out, ref


def _namespaces(pairs):
    import types

    return [types.SimpleNamespace(gate_and_up_proj=a, down_proj=b) for a, b in pairs]


if __name__ == "__main__":
    sys.exit(main())
