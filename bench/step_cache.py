"""The step cache on real-width HunyuanImage-3 layers: per choice (off / taylor), full transformer
evaluations, seconds per image, the speed-up, and how far the final latent lies from the uncached one
(relative L2), resident bf16, resident W8A16 and streamed (at least half of the blocks streamed), from ONE run.

    python bench/step_cache.py [--layers 8] [--steps 50] [--tokens 8448] [--stream-frac 0.5]
                               [--rows bf16,w8a16,streamed] [--distil] [--cpu]

Each image is a flow-matching Euler loop of ``--steps`` steps with classifier-free guidance (two rows of
``--tokens / 2`` tokens: 1 MP is 4,096 image tokens plus the prompt) through a decoder of ``--layers``
real-width layers (bench/_synthetic.py: hidden 4096, 64 experts x 3072, top-8), called the way the official
pipeline calls it (``mode="gen_image"``, ``first_step``), with the pack's ``step_cache`` entry on it.
Unlike the real model the decoder sees the same sequence every step (no KV cache), so a step costs the
same throughout. ``--distil``: one row (CFG-distilled), the Distil's 8 steps by default. ``--cpu``: tiny
widths on the CPU (the smoke test). Random weights: the deviation says how far the cache moves the result
on these layers, not how an image from the real weights looks. Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import _synthetic as syn
import torch

CHOICES = ("off", "taylor")


def _tiny() -> None:
    """Tiny widths for the CPU smoke run (the layer classes read these module globals)."""
    syn.H, syn.HEADS, syn.KV, syn.HD, syn.E, syn.W, syn.TOPK = 64, 4, 2, 16, 8, 64, 2


class Decoder(syn.Stack):
    """model.model of the real checkpoint: takes the official decoder keywords, returns hidden states."""

    def forward(self, x, mode=None, first_step=None):
        return super().forward(x)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timestep_embedding(t: float, dim: int, dev) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] that change smoothly over the steps (the random layers are not
    trained to make the real embedding's fast features smooth, as the model is)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=dev, dtype=torch.float32) / half)
    angles = t * freqs
    return torch.cat([angles.cos(), angles.sin()])[None, None]


def run_image(decoder: Decoder, settings, steps: int, tokens: int, cfg: bool, dev, seed: int = 0):
    """One image: the final latent, the decoder's full evaluations, seconds."""
    from hunyuan_image3.hunyuan_loader.hooks.step_cache import StepCache

    rows = 2 if cfg else 1
    g = torch.Generator(device=dev).manual_seed(seed)
    n_text = max(1, tokens // rows // 32)
    n_img = tokens // rows - n_text
    text = torch.randn(rows, n_text, syn.H, device=dev, generator=g).to(torch.bfloat16)
    z = torch.randn(1, n_img, syn.H, device=dev, generator=g)
    calls = [0]
    hook = StepCache(decoder, settings, steps) if settings.enabled else None
    counter = decoder.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    if hook is not None:
        hook.attach()
    _sync(dev)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i in range(steps):
                t, t_next = 1 - i / steps, 1 - (i + 1) / steps
                x = torch.cat([z] * rows) + timestep_embedding(t, syn.H, dev)
                seq = torch.cat([text, x.to(torch.bfloat16)], dim=1)
                out = decoder(seq, mode="gen_image", first_step=i == 0)
                v = out[:, n_text:].float()
                if cfg:
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + 5.0 * (v_cond - v_uncond)
                z = z + (t_next - t) * v
        _sync(dev)
    finally:
        if hook is not None:
            hook.detach()
        counter.remove()
    return z, calls[0], time.perf_counter() - t0


def bench_rows(label: str, decoder: Decoder, args, dev, streamer=None) -> list[tuple]:
    """off then taylor on the same decoder and inputs; ``streamer``: count its block copies per image."""
    from hunyuan_image3.hunyuan_loader.hooks.step_cache import StepCacheSettings

    cfg = not args.distil
    run_image(decoder, StepCacheSettings(), 1, args.tokens, cfg, dev)  # warm-up (kernels, tuners)
    out, ref = [], None
    for kind in CHOICES:
        if streamer is not None:
            streamer.reset()  # empty slots: each image copies the same way from its first step
        before = streamer.copies if streamer is not None else 0
        z, evals, secs = run_image(decoder, StepCacheSettings(kind), args.steps, args.tokens, cfg, dev)
        copied = streamer.copies - before if streamer is not None else None
        if ref is None:
            ref, ref_secs = z, secs
        dev_l2 = float((z - ref).norm() / ref.norm())
        out.append((label, kind, evals, secs, ref_secs / secs, dev_l2, copied))
        print(f"{label:34s} {kind:7s} {evals:4d} full evaluations  {secs:8.2f} s/image  {ref_secs / secs:5.2f}x  "
              f"rel. L2 {dev_l2:.4f}" + (f"  {copied} block copies" if copied is not None else ""), flush=True)
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--tokens", type=int, default=8448, help="tokens of both CFG rows together (1 MP: 8448)")
    ap.add_argument("--stream-frac", type=float, default=0.5)
    ap.add_argument("--rows", default="bf16,w8a16,streamed")
    ap.add_argument("--distil", action="store_true", help="one row (CFG-distilled), 8 steps by default")
    ap.add_argument("--cpu", action="store_true", help="tiny widths on the CPU (smoke test)")
    args = ap.parse_args()
    args.steps = args.steps or (8 if args.distil else 50)
    rows = args.rows.split(",")
    if args.cpu:
        _tiny()
        torch.set_num_threads(1)  # tiny widths: one thread is as fast, and kinder to a shared machine
        syn.load_pack()
        dev = torch.device("cpu")
    else:
        if not syn.start_bench("bench/step_cache.py"):
            return 0
        dev = torch.device("cuda", 0)
    from hunyuan_image3.hunyuan_loader.hooks.step_cache import StepCacheSettings
    from hunyuan_image3.memory.residency import Placement, ResidencyManager, ResidencyPlan

    s = StepCacheSettings("taylor")
    print(f"{args.layers} layers of hidden {syn.H}, {syn.E} experts x {syn.W}, top-{syn.TOPK}; {args.steps} steps, "
          f"{'1 row' if args.distil else '2 CFG rows'} of {args.tokens // (1 if args.distil else 2)} tokens; taylor = "
          f"interval {s.interval}, order {s.order}, first {s.first_steps} steps in full; on {dev}", flush=True)
    results = []
    if "bf16" in rows or "streamed" in rows:
        decoder = Decoder([syn.make_layer(dev, seed=i) for i in range(args.layers)], dev)
        if "bf16" in rows:
            results += bench_rows("resident bf16", decoder, args, dev)
        if "streamed" in rows:
            n = args.layers
            k = max(1, math.ceil(args.stream_frac * n))
            mgr = ResidencyManager(decoder, decoder.layers, dev, allow_cpu_streaming=dev.type == "cpu")
            plan = ResidencyPlan(tuple(Placement.STREAM if i >= n - k else Placement.GPU for i in range(n)),
                                 tuple(mgr.block_bytes), mgr.other_bytes)
            t0 = time.perf_counter()
            mgr.apply(plan)
            print(f"streaming {k} of {n} blocks (applied in {time.perf_counter() - t0:.1f} s)", flush=True)
            results += bench_rows(f"streamed bf16 ({k} of {n} streamed)", decoder, args, dev, streamer=mgr.streamer)
            mgr.close()
        del decoder
        _free()
    if "w8a16" in rows:
        layers = []
        for i in range(args.layers):
            layers.append(syn.quantize_layer(syn.make_layer(dev, seed=i), "w8a16"))
            _free()
        results += bench_rows("resident W8A16", Decoder(layers, dev), args, dev)
        del layers
        _free()
    print("\nsummary (taylor vs off, same layers and inputs):")
    for label, kind, evals, _secs, speed, dev_l2, _ in results:
        if kind != "off":
            print(f"  {label:34s} {kind}: {speed:.2f}x faster per image, {evals}/{args.steps} full evaluations, "
                  f"final latent {100 * dev_l2:.2f}% from the uncached one (relative L2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
