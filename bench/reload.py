"""Disk load vs soft unload (park) vs reload (restore) for bf16 / int8 / nf4, from ONE run.

    python bench/reload.py [--layers 2] [--dir /tmp/hy3-reload-bench]

Writes a synthetic multi-GB safetensors checkpoint (real-size HunyuanImage-3 layers,
one shard per layer) to local disk, drops it from the page cache (posix_fadvise), and
loads it the way a real load does (safetensors -> GPU; int8/nf4 quantized on the GPU
while loading). Needs CUDA (prints that and exits 0 otherwise).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from _synthetic import GB, Layer, Stack, copy_rates, make_layer, quantize_layer, start_bench, step_input


def _evict(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write(path: Path, n: int, dev) -> tuple[int, float]:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    total, t0 = 0, time.perf_counter()
    for i in range(n):
        layer = make_layer(dev, seed=i)
        sd = {k: v.to("cpu") for k, v in layer.state_dict().items()}
        total += sum(v.numel() * v.element_size() for v in sd.values())
        save_file(sd, path / f"layer-{i:05d}.safetensors")
        del layer, sd
        torch.cuda.empty_cache()
    _evict(path)
    return total, time.perf_counter() - t0


def _load(path: Path, n: int, mode: str, dev) -> Stack:
    from safetensors.torch import load_file

    layers = []
    for i in range(n):
        with torch.device("meta"):
            layer = Layer().to(torch.bfloat16)
            layer.mlp.gate.wg.float()
        layer.load_state_dict(load_file(path / f"layer-{i:05d}.safetensors", device=str(dev)), assign=True)
        if mode != "bf16":
            layer = quantize_layer(layer, mode)
            torch.cuda.empty_cache()
        layers.append(layer.eval())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Stack(layers, dev)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/hy3-reload-bench")
    args = ap.parse_args()
    if not start_bench("bench/reload.py"):
        return 0
    from hunyuan_image3.memory.residency import ResidencyManager

    dev = torch.device("cuda", 0)
    path = Path(args.dir)
    pinned, _ = copy_rates(dev)
    size, t_write = _write(path, args.layers, dev)
    print(f"checkpoint: {args.layers} layers, {size / GB:.2f} GB bf16 safetensors written in {t_write:.1f} s; "
          f"pinned host->GPU rate {pinned / GB:.1f} GB/s")
    x = step_input(dev, 512)
    print("| format | GPU GB | disk load s | park s | restore s | restore GB/s | vs pinned | reload vs disk | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    releases: list[str] = []
    for mode in ("bf16", "int8", "nf4"):
        _evict(path)
        t0 = time.perf_counter()
        model = _load(path, args.layers, mode, dev)
        t_disk = time.perf_counter() - t0
        with torch.no_grad():
            ref = model(x)
        mgr = ResidencyManager(model, model.layers, dev)
        nbytes = mgr.gpu_bytes()
        report = mgr.park()
        t_restore = mgr.restore()
        mgr.wait_released()
        releases.append(f"{mode} {mgr.last_release_s:.2f} s")
        with torch.no_grad():
            exact = torch.equal(model(x), ref)
        rate = nbytes / t_restore
        print(f"| {mode} | {nbytes / GB:.2f} | {t_disk:.2f} | {report.seconds:.2f} | {t_restore:.2f} | "
              f"{rate / GB:.1f} | {rate / pinned:.0%} | {t_disk / t_restore:.1f}x | {exact} |")
        mgr.close()
        del model, mgr, ref
        gc.collect()
        torch.cuda.empty_cache()
    print("restore = until the model is usable; unpinning + freeing the RAM copy then runs in a "
          f"background thread: {', '.join(releases)}")
    print("targets: reload vs disk >= 10x, restore rate >= 70% of the pinned copy rate")
    shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
