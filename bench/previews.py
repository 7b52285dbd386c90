"""The cost of live previews (issue 24), from ONE run: a 50-step sampling loop over real-size decoder
layers at 1 MP, previews off vs on (the registry entry diffusion_preview and the reporter, as Generate
runs them, plus what ComfyUI then does with each preview: scale it to 512 px and encode a JPEG), with
every layer resident and with some streamed; and the one-time fit of the projection on a VAE of the real
one's widths (decoder 1024-1024-512-256-128 channels, 3 res-blocks a level, 16x up; encoder mirrored).

    python bench/previews.py                   # CUDA: 4 real-size layers, 8448 tokens, 50 steps, 64x64 latents
    python bench/previews.py --smoke           # any machine (CPU): tiny layers and VAE, a few steps

Prints per-step times, the previews' share of the image's time (measured on these layers, and projected
to the real model's 32 layers from this run's per-layer time), the previews made, whether the final
latents are bit-identical, and the fit's seconds (weights hash, encode + decode + least squares, and a
cached read). Also the real-width VAE decoding a downscaled x0 (the alternative preview source), for
comparison. Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import load_pack, settings_refresh  # noqa: E402

REAL_LAYERS = 32


# -- a VAE of the real one's widths (our own code; the official AutoencoderKLConv3D interface) ------------
class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(32, cin), nn.Conv3d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(32, cout), nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(32, c), nn.Conv3d(c, 3 * c, 1), nn.Conv3d(c, c, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, t * h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(o.transpose(-1, -2).reshape(b, c, t, h, w))


class _Shuffle(nn.Module):
    """2x spatial up (conv to 4x channels, pixel shuffle) or down (pixel unshuffle, conv)."""

    def __init__(self, cin: int, cout: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv3d(cin, cout * 4, 3, padding=1) if up else nn.Conv3d(cin * 4, cout, 3, padding=1)

    def forward(self, x):
        if self.up:
            y = self.conv(x)
            return F.pixel_shuffle(y.squeeze(2), 2).unsqueeze(2)
        return self.conv(F.pixel_unshuffle(x.squeeze(2), 2).unsqueeze(2))


class _Coder(nn.Module):
    def __init__(self, cin: int, cout: int, widths: list[int], up: bool, blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(cin, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = widths[0]
        if up:
            layers += [_Res(c, c), _Attn(c), _Res(c, c)]
        for i, width in enumerate(widths):
            for _ in range(blocks):
                layers.append(_Res(c, width))
                c = width
            if i < len(widths) - 1:
                layers.append(_Shuffle(c, widths[i + 1], up))
                c = widths[i + 1]
        if not up:
            layers += [_Res(c, c), _Attn(c), _Res(c, c)]
        self.body = nn.Sequential(*layers)
        self.norm_out, self.conv_out = nn.GroupNorm(32, widths[-1]), nn.Conv3d(widths[-1], cout, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class _Dist:
    def __init__(self, moments):
        self.mean = moments.chunk(2, dim=1)[0]

    def mode(self):
        return self.mean


class BenchVAE(nn.Module):
    def __init__(self, widths: list[int], latent: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.config = type("Config", (), {"scaling_factor": 0.562679178327931, "shift_factor": None})()
        self.ffactor_spatial, self.ffactor_temporal = 2 ** (len(widths) - 1), 1
        self.encoder = _Coder(3, 2 * latent, list(reversed(widths)), up=False, blocks=blocks - 1)
        self.decoder = _Coder(latent, 3, widths, up=True, blocks=blocks)

    def encode(self, x, return_dict=True):
        d = _Dist(self.encoder(x if x.ndim == 5 else x[:, :, None]))
        return (d,)

    def decode(self, z, return_dict=True, generator=None):
        return (self.decoder(z),)


class _WithVAE(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae


# -- the sampling loop -------------------------------------------------------------------------------
class TinyStack(nn.Module):
    """--smoke: ``layers`` small MLP blocks (a ``.layers`` list, as the residency manager streams it)."""

    def __init__(self, h: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
                                    for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class Euler:
    """The official flow-matching Euler step (hunyuan_image_3_pipeline.py:273-288, :394-424), shift 3."""

    def __init__(self, steps: int, device) -> None:
        s = torch.linspace(1, 0, steps + 1)
        self.sigmas = (3 * s / (1 + 2 * s)).to(device)
        self.timesteps = self.sigmas[:-1] * 1000
        self.config = type("Config", (), {"num_train_timesteps": 1000})()
        self.i = 0

    def step(self, model_output, timestep, sample, return_dict=False):
        prev = sample.float() + model_output.float() * (self.sigmas[self.i + 1] - self.sigmas[self.i])
        self.i += 1
        return (prev,)


class _Pipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


class LoopModel:
    """What step_hooks needs: ``pipeline.scheduler`` (the registry keys on this object)."""

    def __init__(self, scheduler):
        self.pipeline = _Pipe(scheduler)


def comfy_side(image) -> None:
    """What ComfyUI's server does with a preview (server.py send_image): fit 512 px, JPEG quality 95."""
    from PIL import Image, ImageOps

    ImageOps.contain(image, (512, 512), Image.Resampling.BILINEAR).save(io.BytesIO(), format="JPEG", quality=95)


def sample(stack, x, latent: int, steps: int, dev, previews: bool, every: int):
    """One image's diffusion: ``steps`` passes of ``stack``; its output's first positions give the flow
    prediction. Returns (seconds, final latents, previews made, seconds in the preview reporter)."""
    from hunyuan_image3.hunyuan_loader.generation import step_hooks
    from hunyuan_image3.hunyuan_loader.preview.projection import Projection
    from hunyuan_image3.hunyuan_loader.preview.stream import PreviewStream

    g = torch.Generator().manual_seed(0)
    projection = Projection(torch.randn(3, 32, generator=g) * 0.1, torch.zeros(3))
    latents = torch.randn(1, 32, latent, latent, generator=g).to(dev)
    sched = Euler(steps, dev)
    model = LoopModel(sched)
    made, spent = [0], [0.0]

    def report(done, total, image):
        t0 = time.perf_counter()
        if image is not None:
            comfy_side(image)
            made[0] += 1
        spent[0] += time.perf_counter() - t0

    stream = PreviewStream(projection, every, steps) if previews else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    with torch.inference_mode(), step_hooks(model, steps, None, None, (stream, report) if previews else None):
        sync()
        t0 = time.perf_counter()
        for t in sched.timesteps:
            out = stack(x)
            pred = out[0, : latent * latent, :32].float().T.reshape(1, 32, latent, latent) + latents * 0.01
            latents = model.pipeline.scheduler.step(pred, t, latents, return_dict=False)[0]
        sync()
    return time.perf_counter() - t0, latents, made[0], spent[0]


def bench_loop(args, dev) -> None:
    from _synthetic import Stack, make_layer, step_input

    if args.smoke:
        h = 64
        stack = TinyStack(h, args.layers).to(dev)
        x = torch.randn(2, args.tokens // 2, h, device=dev)
    else:
        stack = Stack([make_layer(dev, seed=i) for i in range(args.layers)], dev)
        x = step_input(dev, args.tokens)
    every = args.every
    rows = []
    modes = [("resident", None)]
    if args.stream > 0:
        modes.append(("streamed", args.stream))
    for name, stream_n in modes:
        if stream_n:
            from hunyuan_image3.memory.residency import ResidencyManager

            mgr = ResidencyManager(stack, stack.layers, dev, allow_cpu_streaming=dev.type == "cpu")
            headroom = 8 * 2**30 if dev.type == "cuda" else 2**20
            budget = mgr.other_bytes + (args.layers - stream_n + 2) * mgr.block_bytes[0] + headroom
            plan = mgr.plan_for_budget(budget, headroom, min_streamed=stream_n)
            mgr.apply(plan)
            name = f"streamed ({len(plan.streamed)} of {args.layers})"
        sample(stack, x, args.latent, 2, dev, True, every)  # warm-up (kernels, pinned pool)
        off, lat_off, _, _ = sample(stack, x, args.latent, args.steps, dev, False, every)
        on, lat_on, made, spent = sample(stack, x, args.latent, args.steps, dev, True, every)
        off2, _, _, _ = sample(stack, x, args.latent, args.steps, dev, False, every)
        base = min(off, off2)
        rows.append((name, base, on, made, spent, torch.equal(lat_off, lat_on)))
    print(f"\n{args.layers} layers, {args.tokens} tokens/step, {args.steps} steps, latents 32x{args.latent}x"
          f"{args.latent}, a preview every {every} step(s) (HUNYUAN_PREVIEW_EVERY default 1)")
    print("| layers | s/step off | s/step on | previews | reporter ms/preview (incl. 512 px JPEG) | "
          "added, this run | projected, 32 layers | final latents identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, base, on, made, spent, same in rows:
        per_step = base / args.steps
        added = on - base
        per_layer = per_step / args.layers
        real_image = per_layer * REAL_LAYERS * args.steps
        print(f"| {name} | {per_step:.4f} | {on / args.steps:.4f} | {made} | {spent / max(made, 1) * 1e3:.2f} | "
              f"{added / base * 100:+.2f}% | {max(added, 0) / real_image * 100:.2f}% | {same} |")


def bench_fit(args, dev) -> None:
    from hunyuan_image3.hunyuan_loader.preview import vae_fit

    widths = [32, 32, 32] if args.smoke else [1024, 1024, 512, 256, 128]
    with torch.device(dev):  # made where it runs (the real-width one is ~1.2 B parameters)
        vae = BenchVAE(widths).eval()
    params = sum(p.numel() for p in vae.decoder.parameters())
    model = _WithVAE(vae)
    t0 = time.perf_counter()
    vae_fit.vae_fingerprint(vae)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    vae_fit.projection_for(model)
    t_first = time.perf_counter() - t0
    vae_fit._PROJECTIONS.clear()  # a new load of the same checkpoint: hash + read the cached file
    t0 = time.perf_counter()
    vae_fit.projection_for(model)
    t_cached = time.perf_counter() - t0
    print(f"\nfit on a VAE of widths {widths} (decoder {params / 1e6:.0f} M params, fp32, {dev}): first use "
          f"{t_first:.2f} s (of which the weights hash {t_hash:.2f} s; {vae_fit.FIT_IMAGES} images of "
          f"{vae_fit.FIT_LATENT * vae.ffactor_spatial} px encoded + decoded, least squares); a later load "
          f"{t_cached:.2f} s (hash + cached file)")
    # the alternative preview source: the real-width decoder on a downscaled x0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    for cells in ((8,) if args.smoke else (16, 32, 64)):
        z = torch.randn(1, 32, cells, cells, device=dev)
        with torch.inference_mode():
            vae_fit.decode_latents(vae, z)
            sync()
            t0 = time.perf_counter()
            vae_fit.decode_latents(vae, z)
            sync()
        print(f"VAE decode of a {cells}x{cells} x0 ({cells * vae.ffactor_spatial} px): {time.perf_counter() - t0:.3f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CPU smoke test)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 4; smoke 2)")
    ap.add_argument("--stream", type=int, help="of them streamed in the second row (default 2; smoke 1)")
    ap.add_argument("--tokens", type=int, help="tokens per step, both CFG halves (default 8448 = 1 MP)")
    ap.add_argument("--steps", type=int, help="default 50; smoke 4")
    ap.add_argument("--latent", type=int, help="latent side (default 64 = 1024 px)")
    ap.add_argument("--every", type=int, default=1, help="a preview every N steps (default 1)")
    ap.add_argument("--skip-fit", action="store_true")
    args = ap.parse_args()
    smoke = args.smoke
    args.layers = args.layers or (2 if smoke else 4)
    args.stream = (1 if smoke else 2) if args.stream is None else args.stream
    args.tokens = args.tokens or (256 if smoke else 8448)
    args.steps = args.steps or (4 if smoke else 50)
    args.latent = args.latent or (8 if smoke else 64)
    if not smoke and not torch.cuda.is_available():
        print("bench/previews.py needs a CUDA GPU for real-size layers; --smoke runs tiny sizes here.")
        return 0
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="hy3-preview-bench-")  # a fresh fit, not the user's
    load_pack()
    settings_refresh()
    dev = torch.device("cuda", 0) if torch.cuda.is_available() and not smoke else torch.device("cpu")
    bench_loop(args, dev)
    if not args.skip_fit:
        bench_fit(args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
