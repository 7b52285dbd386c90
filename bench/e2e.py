"""One image end to end through the pack, split into stages: where the time and the memory go.

    python bench/e2e.py [--model DIR | --layers N] [--variant base|instruct|distil] [--quant bf16|int8|nf4]
                        [--offload disabled|smart] [--size 1024x1024] [--steps N] [--think]
                        [--edit] [--dir /tmp/hy3_e2e] [--cpu] [--profile] [--without ENTRY,...]

Without --model it builds the test model at the real model's layer widths (hidden 4096, 64 experts
x 3072, top-8; random weights, N decoder layers; its VAE and vision encoder stay small) under --dir.
Given an official checkpoint folder (any number of layers), it times that.

Per stage: load; the text stage (think / recaption: tokens and ms per token, of which decoder
layers); the input preparation before the first diffusion step; each diffusion step split into
decoder layers (CUDA events around every layer) and the rest; the VAE decode. Next to each stage:
its peak GPU memory above the weights, and what the plan reserved for activations
(memory/estimator.py for this size and the text / reference tokens). Last, a projection to the real
model's 32 layers from the measured per-layer and outside-the-layers parts. ``--profile`` then runs the
same image again under torch.profiler (bench/e2e_profile.py): the top ops by GPU and host time, kernel
launches and host syncs per decoder pass. ``--without rope_cache,cache_end_once`` then takes those entries of
the hook registry off, runs the same image again, puts them back and runs it once more: each stage
without / with them, as ratios from one run (what an entry saves on this checkpoint). On the CPU (--cpu) the
stages are those of the CPU run (a smoke run; its timings say nothing). Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _synthetic import GB, load_pack

REAL_LAYERS = 32  # the official model's decoder layers (HUNYUAN3_FACTS.md)
MIB = 1024**2


@dataclass
class Timeline:
    """What one generation did, stamped from hooks and the generation's own progress callbacks."""

    device: torch.device
    call_start: float = 0.0
    call_end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # after each text token (synchronised)
    forward_starts: list[float] = field(default_factory=list)  # every pass through the decoder
    step_ends: list[float] = field(default_factory=list)  # after each diffusion step (synchronised)
    vae: list[float] = field(default_factory=list)  # decode start, end
    layer_ms: list[float] = field(default_factory=list)  # per decoder pass: its layers' time
    peaks: dict[str, int] = field(default_factory=dict)  # stage -> peak bytes allocated
    _events: list[tuple[object, object]] = field(default_factory=list)
    _forward_events: list[list[tuple[object, object]]] = field(default_factory=list)

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def peak(self, stage: str) -> None:
        """Close the stage that ran since the last call: its peak, then a fresh count."""
        if self.device.type == "cuda":
            self.peaks[stage] = max(self.peaks.get(stage, 0), torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def layer_times(self) -> None:
        for events in self._forward_events:
            if self.device.type == "cuda":
                self.layer_ms.append(sum(a.elapsed_time(b) for a, b in events))
            else:
                self.layer_ms.append(sum((b - a) * 1e3 for a, b in events))


def instrument(model, tl: Timeline) -> list:
    """Hooks that stamp the timeline (removed by the caller): a pre-hook on the decoder, a pair of
    events around every decoder layer, and a wrap of the VAE's decode."""
    cuda = tl.device.type == "cuda"
    handles = []

    def model_pre(_module, _args, _kwargs=None):
        tl.forward_starts.append(tl.sync())
        tl._forward_events.append([])

    # The decoder, not the top model: every text token and every diffusion step runs it once (the
    # official pipeline calls the top model per step, hunyuan_image_3_pipeline.py:859; other code may
    # call the decoder directly).
    handles.append(model.model.register_forward_pre_hook(model_pre, with_kwargs=True))
    for layer in model.model.layers:
        def pre(_m, _a, _k=None):
            ev = torch.cuda.Event(enable_timing=True) if cuda else None
            if cuda:
                ev.record()
            tl._events.append((ev if cuda else time.perf_counter(), None))

        def post(_m, _a, _k=None, _o=None):
            start, _ = tl._events.pop()
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            if tl._forward_events:
                tl._forward_events[-1].append((start, end))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    vae = getattr(model, "vae", None)
    if vae is not None and hasattr(vae, "decode"):
        original = vae.decode

        def decode(*args, **kwargs):
            tl.peak("later steps")
            tl.vae.append(tl.sync())
            out = original(*args, **kwargs)
            tl.vae.append(tl.sync())
            tl.peak("vae decode")
            return out

        vae.decode = decode
        handles.append(_Restore(vae, "decode"))
    return handles


class _Restore:
    """A handle that takes an instance attribute back off (the class's method again)."""

    def __init__(self, obj, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


def run_image(loaded, req, tl: Timeline):
    """Generate ``req`` with ``loaded`` through the pack's one generate call, stamping ``tl``."""
    from hunyuan_image3.hunyuan_loader.generation import generate

    def on_step(step: int, steps: int) -> None:
        tl.step_ends.append(tl.sync())
        if step == 1:
            tl.peak("text + prep + step 1")

    def on_token(tokens: int, total: int) -> None:
        tl.token_times.append(tl.sync())

    handles = instrument(loaded.model, tl)
    try:
        tl.peak("load")
        tl.call_start = tl.sync()
        result = generate(loaded, req, progress=on_step, text_progress=on_token)
        tl.call_end = tl.sync()
    finally:
        for h in handles:
            h.remove()
    tl.layer_times()
    return result


@dataclass
class Stages:
    """The timeline cut into the issue's stages (seconds, ms)."""

    text_tokens: int
    text_s: float
    text_ms_per_token: float
    text_layer_ms_per_token: float
    prep_s: float
    step_ms: list[float]
    step_layer_ms: list[float]
    vae_s: float
    total_s: float


def stages(tl: Timeline) -> Stages:
    steps = len(tl.step_ends)
    image_forwards = tl.forward_starts[-steps:] if steps else []
    text_forwards = len(tl.forward_starts) - len(image_forwards)
    n_tok = len(tl.token_times)
    text_s = (tl.token_times[-1] - tl.call_start) if n_tok else 0.0
    first_image = image_forwards[0] if image_forwards else tl.call_end
    prep_s = first_image - (tl.token_times[-1] if n_tok else tl.call_start)
    step_ms = [(end - start) * 1e3 for start, end in zip(image_forwards, tl.step_ends)]
    step_layer_ms = tl.layer_ms[text_forwards:][:steps]
    text_layer = tl.layer_ms[:text_forwards]
    vae_s = (tl.vae[1] - tl.vae[0]) if len(tl.vae) >= 2 else 0.0
    return Stages(n_tok, text_s, text_s * 1e3 / n_tok if n_tok else 0.0,
                  sum(text_layer) / n_tok if n_tok else 0.0, prep_s, step_ms, step_layer_ms, vae_s,
                  tl.call_end - tl.call_start)


def projection(st: Stages, n_layers: int, steps: int) -> dict[str, float]:
    """The stages at 32 layers: the layers' part scaled, the rest as measured."""
    k = REAL_LAYERS / n_layers
    later = st.step_ms[1:] or st.step_ms
    step = statistics.median(later) if later else 0.0
    layers = statistics.median(st.step_layer_ms[1:] or st.step_layer_ms) if st.step_layer_ms else 0.0
    step32 = layers * k + (step - layers)
    tok32 = st.text_layer_ms_per_token * k + (st.text_ms_per_token - st.text_layer_ms_per_token)
    return {"step_ms": step32, "per_layer_ms": layers / n_layers, "rest_ms": step - layers,
            "token_ms": tok32, "image_s": st.prep_s + steps * step32 / 1e3 + st.vae_s
            + st.text_tokens * tok32 / 1e3}


def report(label: str, tl: Timeline, st: Stages, n_layers: int, steps: int, weights: int, reserve: int) -> None:
    later = st.step_ms[1:] or st.step_ms
    lay = st.step_layer_ms[1:] or st.step_layer_ms
    print(f"\n== {label}: {n_layers} layers, {steps} steps, one image in {st.total_s:.2f} s")
    if st.text_tokens:
        print(f"text stage      {st.text_s:8.2f} s  {st.text_tokens} tokens, {st.text_ms_per_token:.1f} ms/token "
              f"(decoder layers {st.text_layer_ms_per_token:.1f})")
    print(f"input prep      {st.prep_s:8.2f} s  (before the first diffusion step)")
    if later:
        print(f"first step      {st.step_ms[0]:8.1f} ms")
        print(f"later steps     {statistics.median(later):8.1f} ms median  (decoder layers "
              f"{statistics.median(lay) if lay else 0:.1f} ms, {statistics.median(lay) / n_layers if lay else 0:.2f} "
              "per layer; the rest "
              f"{statistics.median(later) - (statistics.median(lay) if lay else 0):.1f} ms)")
    print(f"VAE decode      {st.vae_s:8.2f} s")
    if tl.peaks:
        print(f"weights on the GPU {weights / GB:.2f} GB; planned activation headroom {reserve / GB:.2f} GB")
        for stage in ("text + prep + step 1", "later steps", "vae decode"):
            if stage in tl.peaks:
                above = tl.peaks[stage] - weights
                print(f"  peak {stage:22s} {tl.peaks[stage] / GB:7.2f} GB  = weights + {above / GB:.2f} GB "
                      f"({above / max(reserve, 1):.2f}x the plan)")
    p = projection(st, n_layers, steps)
    print(f"at {REAL_LAYERS} layers: step {p['step_ms']:.1f} ms ({p['per_layer_ms']:.2f} ms/layer x {REAL_LAYERS} + "
          f"{p['rest_ms']:.1f} ms rest = {p['step_ms'] / (p['per_layer_ms'] * REAL_LAYERS or 1):.2f}x the layers), "
          f"think {p['token_ms']:.1f} ms/token, image ~{p['image_s']:.1f} s")


def check_installed(loaded, names: list[str]) -> None:
    """Refuse (SystemExit) entries this model does not have, before an image is timed."""
    from hunyuan_image3.hunyuan_loader.hooks.registry import hook_names

    installed = hook_names(loaded.model)
    missing = [n for n in names if n not in installed]
    if missing:
        raise SystemExit(f"--without: {', '.join(missing)} not installed on this model (installed: "
                         f"{', '.join(installed)})")


def compare_without(loaded, req, names: list[str], dev: torch.device) -> tuple[Stages, Stages, dict[str, float]]:
    """The same image without the registry entries ``names``, then with them again (so neither side is
    the warm-up): (without, with again, the ratios without / with of the text's ms per token, the later
    steps' median and the whole image; 0 where a stage is absent)."""
    from hunyuan_image3.hunyuan_loader.hooks.registry import registry

    reg = registry(loaded.model)
    check_installed(loaded, names)
    hooks = {name: reg.get(name) for name in names}
    for name in names:
        reg.remove(name)
    try:
        tl = Timeline(dev)
        run_image(loaded, req, tl)
        off = stages(tl)
    finally:
        for name, hook in hooks.items():
            reg.install(name, hook)
    tl = Timeline(dev)
    run_image(loaded, req, tl)
    on = stages(tl)
    on_steps, off_steps = on.step_ms[1:] or on.step_ms, off.step_ms[1:] or off.step_ms
    return off, on, {
        "text_ms_per_token": (off.text_ms_per_token / on.text_ms_per_token) if on.text_tokens else 0.0,
        "step_ms": (statistics.median(off_steps) / statistics.median(on_steps)) if on_steps else 0.0,
        "total_s": off.total_s / on.total_s,
        "same_tokens": float(off.text_tokens == on.text_tokens),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint folder (default: the test model at real layer widths)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--variant", choices=("base", "instruct", "distil"), default="base")
    ap.add_argument("--quant", choices=("bf16", "int8", "nf4"), default="bf16")
    ap.add_argument("--offload", choices=("disabled", "smart"), default="disabled")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    ap.add_argument("--think", action="store_true", help="Instruct: run the think text first (bot_task think)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--edit", action="store_true", help="Instruct: edit a reference image")
    ap.add_argument("--dir", default="/tmp/hy3_e2e")
    ap.add_argument("--cpu", action="store_true", help="a smoke run on the CPU (tiny test model unless --model)")
    ap.add_argument("--profile", action="store_true",
                    help="then the same image again under torch.profiler: top ops, launches and host syncs per pass")
    ap.add_argument("--without", default="",
                    help="then the same image again without these hook entries (comma-separated names of "
                         "docs/hooks.md, e.g. rope_cache,cache_end_once): without / with per stage")
    args = ap.parse_args()
    without = [n for n in args.without.split(",") if n]
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("bench/e2e.py needs a CUDA GPU (or --cpu for a smoke run); nothing to measure here.")
        return 0
    load_pack()
    from hunyuan_image3.hunyuan_loader.hooks.registry import HOOK_ORDER

    unknown = [n for n in without if n not in HOOK_ORDER]
    if unknown:  # before anything loads
        ap.error(f"--without: unknown entry {', '.join(unknown)}; the names: {', '.join(HOOK_ORDER)}")
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model
    from hunyuan_image3.hunyuan_loader.request import GenerationRequest
    from hunyuan_image3.memory.estimator import estimate_inference_gb

    folder = Path(args.model) if args.model else build(Path(args.dir), args.layers, args.variant, cuda)
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    loaded = load_model(LoadSpec(str(folder), quant=args.quant, offload=args.offload,
                                 devices="auto"))
    load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() if cuda else 0
    n_layers = len(loaded.model.model.layers)
    w, h = (int(v) for v in args.size.lower().split("x"))
    images = []
    if args.edit:
        from PIL import Image

        images = [Image.new("RGB", (w, h), (120, 80, 40))]
    req = GenerationRequest(prompt="a red fox in the snow, photograph", seed=1, steps=args.steps, resolution=args.size,
                            width=w, height=h, bot_task="think" if args.think else None, images=images,
                            max_new_tokens=args.max_new_tokens)
    check_installed(loaded, without)
    tl = Timeline(dev)
    print(f"load {load_s:.1f} s ({loaded.spec.describe()})")
    result = run_image(loaded, req, tl)
    reserve = int(estimate_inference_gb(w, h, config=loaded.model.config, moe_impl=loaded.spec.moe_impl,
                                        extra_tokens=len(tl.token_times)) * 1024**3)
    steps = result.steps
    st = stages(tl)
    report(f"{loaded.variant.name} {args.quant} {args.offload}", tl, st, n_layers, steps, weights, reserve)
    if without:
        off, on, ratios = compare_without(loaded, req, without, dev)
        for label, st_ in ((f"the same without {', '.join(without)}", off), ("and with them again", on)):
            report(label, Timeline(dev), st_, n_layers, steps, weights, reserve)
        text = f"text {ratios['text_ms_per_token']:.2f}x ms per token, " if ratios["text_ms_per_token"] else ""
        print(f"without / with: {text}later steps {ratios['step_ms']:.2f}x, the whole image {ratios['total_s']:.2f}x"
              + ("" if ratios["same_tokens"] else " (the text had another length: compare per token only)"))
    if args.profile:
        from e2e_profile import print_profile, profile_image

        print_profile(profile_image(loaded, req, run_image, Timeline(dev)))
    return 0


def build(root: Path, layers: int, variant: str, cuda: bool) -> Path:
    """The test model at real layer widths (bench/load.py's builder), or the tiny one on the CPU."""
    if not cuda:
        from hunyuan_image3.hunyuan_loader.test_model import make_test_model

        folder = root / f"tiny-{variant}"
        if not (folder / "config.json").is_file():
            make_test_model(folder, variant, overwrite=True)
        return folder
    from load import build_checkpoint

    return build_checkpoint(root, layers, torch.device("cuda"), variant=variant)


if __name__ == "__main__":
    sys.exit(main())
