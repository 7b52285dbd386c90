"""Several GPUs, step time from ONE run: one GPU resident (the floor), the blocks split over N
devices, and CFG-parallel over N devices (the two CFG rows of each step on different devices at
once), for BF16 and INT8 (W8A16, the INT8 loader's default), on real-size synthetic
HunyuanImage-3 layers (bench/_synthetic.py: ~5 GB per bf16 layer, 8,448 tokens = 2 CFG rows of
a 1 MP image).

    python bench/multigpu.py [--devices auto|cuda:0,cuda:1] [--layers 8] [--steps 3] [--tokens 8448]
                             [--quants bf16,int8]

The split and CFG-parallel runs go through the pack's own code (split_exec.SplitExecution's
block hooks, cfg_parallel.CfgParallel's row-splitting wrapper over replicas made by
clone_decoder). With one visible GPU, "auto" runs both on TWO LOGICAL PARTS OF THAT ONE GPU
(cuda:0,cuda:0): the full code path runs, but nothing crosses a device and the two CFG rows
share one GPU, so those figures are the overhead of the mechanism, not the multi-GPU speed-up;
the output says so. On 2+ GPUs the split moves activations between cards and CFG-parallel copies
the layers to every card. Needs CUDA (says so and exits 0 otherwise). Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from _synthetic import GB, Stack, make_layer, quantize_layer, start_bench, step_input


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _sync(devices) -> None:
    for d in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(d)


def time_steps(model, x, steps: int, devices, warmup: int = 1) -> tuple[float, torch.Tensor]:
    """Seconds per step (one pass over every layer), synchronising every device used; last output."""
    with torch.no_grad():
        for _ in range(warmup):
            out = model(x)
        _sync(devices)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(x)
        _sync(devices)
    return (time.perf_counter() - t0) / steps, out


def build(quant: str, n: int, dev) -> Stack:
    layers = []
    for i in range(n):
        layer = make_layer(dev, seed=i)
        if quant == "int8":
            layer = quantize_layer(layer, "w8a16")
            _free()
        layers.append(layer)
    return Stack(layers, dev).eval()


def run_split(model: Stack, x, devices, steps: int):
    """The layers in contiguous runs over ``devices`` (as memory.devices.plan_split places equal
    cards), activations moved by SplitExecution's hooks."""
    from hunyuan_image3.hunyuan_loader.hooks.split_exec import SplitExecution
    from hunyuan_image3.memory.residency import move_module_weights

    n, k = len(model.layers), len(devices)
    starts = [round(i * n / k) for i in range(k)]
    block_devices = [devices[max(j for j, s in enumerate(starts) if s <= i)] for i in range(n)]
    for layer, dev in zip(model.layers, block_devices):
        move_module_weights(layer, dev)
    ex = SplitExecution(model.layers, block_devices, devices[0], starts=starts)
    try:
        t, out = time_steps(model, x, steps, devices)
        moves = ex.moves
    finally:
        ex.close()
        for layer in model.layers:
            move_module_weights(layer, devices[0])
        _free()
    return t, out, moves, block_devices


def run_cfg_parallel(model: Stack, x, devices, steps: int):
    """A replica of the stack on every other device (shared weights on the same device), the two
    CFG rows of each step on different devices at once."""
    from hunyuan_image3.hunyuan_loader.hooks.cfg_parallel import CfgParallel, clone_decoder

    replicas = [clone_decoder(model, dev) for dev in devices[1:]]
    par = CfgParallel(model, devices[0], replicas)
    try:
        t, out = time_steps(model, x, steps, devices, warmup=2)  # the first call runs the rows one by one
        calls = par.parallel_calls
        copied = sum(r.owned_bytes for r in replicas)
    finally:
        par.close()
        for r in replicas:
            r.close()
        _free()
    return t, out, calls, copied


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="auto")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8448)
    ap.add_argument("--quants", default="bf16,int8")
    args = ap.parse_args()
    if not start_bench("bench/multigpu.py"):
        return 0
    if args.devices == "auto":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [torch.device(d.strip()) for d in args.devices.split(",")]
    logical = len(set(devices)) == 1
    if len(devices) == 1:
        devices = devices * 2
    primary = devices[0]
    names = ",".join(map(str, devices))
    print(f"devices: {names} ({', '.join(torch.cuda.get_device_name(d) for d in dict.fromkeys(devices))})")
    if logical:
        print("ONE GPU: split and CFG-parallel run on two LOGICAL parts of the same GPU. The code path is the real "
              "one, but no activation crosses a device and both CFG rows share one GPU: the ratios below are the "
              "mechanism's overhead, not the multi-GPU speed-up (that needs 2 GPUs: --devices cuda:0,cuda:1).")
    x = step_input(primary, args.tokens)
    rows = []
    for quant in args.quants.split(","):
        t0 = time.perf_counter()
        model = build(quant, args.layers, primary)
        made = time.perf_counter() - t0
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        t_floor, ref = time_steps(model, x, args.steps, [primary])
        rows.append((quant, "one GPU resident (floor)", str(primary), t_floor, t_floor, "reference"))
        t_split, out, moves, placed = run_split(model, x, devices, args.steps)
        same = "identical" if torch.equal(out, ref) else f"max |diff| {float((out - ref).abs().max()):.2e}"
        rows.append((quant, f"split over {len(devices)} ({moves} hooked moves)", names, t_split, t_floor, same))
        t_cfg, out, calls, copied = run_cfg_parallel(model, x, devices, args.steps)
        diff = float((out.float() - ref.float()).abs().max())
        scale = float(ref.float().abs().max())
        rows.append((quant, f"CFG-parallel over {len(devices)} ({calls} parallel calls, {copied / GB:.1f} GB copied)",
                     names, t_cfg, t_floor, f"max |diff| {diff:.2e} of max |out| {scale:.2e}"))
        runs = ", ".join(f"{d} x{sum(1 for p in placed if p == d)}" for d in dict.fromkeys(placed))
        print(f"{quant}: {args.layers} layers, {size / GB:.1f} GB, built in {made:.1f} s; split: {runs}")
        del model, ref, out
        _free()
    print(f"\n{args.layers} real-size layers, {args.tokens} tokens per step (2 CFG rows), {args.steps} timed steps")
    print("| quant | mode | devices | s/step | vs floor | output vs floor |\n|---|---|---|---|---|---|")
    for quant, mode, devs, t, floor, same in rows:
        print(f"| {quant} | {mode} | {devs} | {t:.3f} | {t / floor:.2f}x | {same} |")
    print("\nissue 13 targets (2 GPUs): split <= 1.10x the floor, identical; CFG-parallel <= 0.60x, within bf16 "
          "tolerance" + (" -- NOT measurable on one GPU (logical parts)." if logical else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
