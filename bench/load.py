"""Load time, peak RSS and peak VRAM: the block-order loader vs the earlier path vs accelerate,
on a synthetic checkpoint of real-size HunyuanImage-3 layers, page cache dropped before EVERY
load, from ONE run. Everything goes through the pack's library (hunyuan_loader.load.pipeline).

    python bench/load.py [--layers N] [--dir /tmp/hy3_load_bench] [--int8-format w8a16|bnb]
                         [--today-int8] [--keep]

Without --layers, the layer count is chosen from the free space of --dir (at least 4): the BF16
set plus the largest pre-quantized copy that exists at the same time (each copy is deleted after
its rows), with a safety margin, and at most what fits the time limit.

Rows: the disk read floor (plain sequential read of the same files, right before and right after each
load: the row is divided by their mean, the disk's rate drifting from minute to minute); ours for bf16 / int8 / nf4
from the BF16 files and for int8 / nf4 pre-quantized copies (written by the pack from the
resident loads), each resident and "smart" with half of the blocks streamed; the earlier path
(from_pretrained with device_map cpu, then the residency engine places blocks) and accelerate's
device_map="auto" + max_memory. Printed as ratios to the disk floor and to the plan's RAM side
(the bytes the placement keeps in pinned RAM). Logits of a short sequence check that the loads
agree. Needs CUDA (prints that and exits 0 otherwise); asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _synthetic import settings_refresh, start_bench

GB = 1e9
GIB = 1024**3
# bytes per real-size layer on disk (measured: 4 layers = 20.2 GB BF16, 10.4 GB int8, 5.6 GB nf4)
LAYER_BYTES = {"bf16": 5.05 * GB, "int8": 2.6 * GB, "nf4": 1.4 * GB}
NON_LAYER_BYTES = 1.0 * GB  # the rest of the synthetic checkpoint (embeddings, VAE, ...), with room to spare
SECONDS_PER_LAYER = 90.0  # the whole bench per layer at ~1.9 GB/s, a floor read around every load (5 layers: 323 s with one floor)
TIME_LIMIT = 8 * 60.0  # the bench must end within 9 minutes: plan for 8
REAL = dict(hidden_size=4096, intermediate_size=3072, num_attention_heads=32, num_key_value_heads=8,
            attention_head_dim=128, num_experts=64, moe_topk=8, moe_intermediate_size=3072, num_shared_expert=1)
T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {text}", flush=True)


# -- the synthetic checkpoint ----------------------------------------------------------------------
def build_checkpoint(root: Path, n_layers: int, dev: torch.device, variant: str = "base") -> Path:
    """The test model's code, tokenizer and generation_config (of ``variant``) with the real model's
    layer sizes and random weights: one shard per decoder block plus one for the rest. Reused if present."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from hunyuan_image3.hunyuan_loader.checkpoint.layout import block_of
    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path, validate_checkpoint
    from hunyuan_image3.hunyuan_loader.test_model import make_test_model

    folder = root / ("HunyuanImage-3-bench-L" + str(n_layers) + ("" if variant == "base" else "-" + variant))
    if (folder / "DONE").is_file():
        return folder
    t0 = time.perf_counter()
    make_test_model(folder, variant, overwrite=True, config_overrides={"num_hidden_layers": n_layers})
    link = loadable_path(validate_checkpoint(folder))  # the remote code's module name, as the loader uses
    for f in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        f.unlink()
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(REAL)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    config = AutoConfig.from_pretrained(str(link), trust_remote_code=True)
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
    names = {k: v for k, v in meta.state_dict().items()}
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(block_of(name), []).append(name)
    order = [None] + sorted(k for k in groups if k is not None)
    weight_map, total = {}, 0
    for i, key in enumerate(order):
        gen = torch.Generator(device=dev).manual_seed(1000 + i)
        shard = {}
        for name in groups[key]:
            t = names[name]
            if "norm" in name and name.endswith("weight"):
                value = torch.ones(t.shape, dtype=t.dtype, device=dev)
            elif t.dtype.is_floating_point:
                value = torch.empty(t.shape, dtype=t.dtype, device=dev).normal_(0.0, 0.02, generator=gen)
            else:
                value = torch.zeros(t.shape, dtype=t.dtype, device=dev)
            shard[name] = value.cpu()
        fname = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in shard.values())
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
        say(f"  wrote {fname}")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "DONE").write_text("ok")
    say(f"synthetic checkpoint: {n_layers} real-size layers, {total / GB:.1f} GB in {time.perf_counter() - t0:.0f} s")
    return folder


# -- page cache, disk floor, memory readings ---------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_caches(files: list[Path]) -> str:
    """Drop the page cache (as root), else evict each file (posix_fadvise DONTNEED)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def disk_floor(files: list[Path]) -> tuple[float, int]:
    """Seconds for a plain sequential read of the files (64 MiB reads), and the bytes read."""
    drop_caches(files)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


class Floors:
    """The disk floor of each load: the mean of a plain read of its files right before it and right after
    it (the one after a load is the next load's before, if it reads the same files). This disk's rate
    drifts from one minute to the next (1.39-2.06 GB/s within one run on the H200), so a floor read
    minutes earlier says little about the load at hand."""

    def __init__(self) -> None:
        self.last: tuple[tuple[Path, ...], float] | None = None  # the latest floor, if no load read since
        self.seen: dict[str, list[float]] = {}  # label -> every floor read, for the summary

    def read(self, files: list[Path], label: str) -> float:
        seconds, nbytes = disk_floor(files)
        self.last = (tuple(files), seconds)
        self.seen.setdefault(label, []).append(seconds)
        say(f"disk floor ({label}): {nbytes / GB:.1f} GB in {seconds:.1f} s = {nbytes / GB / seconds:.2f} GB/s")
        return seconds

    def before(self, files: list[Path], label: str) -> float:
        if self.last is not None and self.last[0] == tuple(files):
            return self.last[1]
        return self.read(files, label)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak RSS added during a block: VmHWM after a reset (Linux clear_refs), else sampled."""

    def __enter__(self) -> PeakRSS:
        self.base = _status("VmRSS")
        self.sampled = self.base
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.sampled = max(self.sampled, _status("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _status("VmHWM") if self.hwm else 0)
        self.added = peak - self.base


# -- one load ---------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    seconds: float
    floor: float
    rss_added: int
    ram_side: int
    block: int
    vram: int
    check: str = ""
    breakdown: str = ""
    order: int = 0

    def line(self) -> str:
        over = (self.rss_added - self.ram_side - self.block) / GB
        ratio = f"{self.rss_added / self.ram_side:.2f}" if self.ram_side else "-"
        return (f"| {self.name} | {self.seconds:.1f} | {self.seconds / self.floor:.2f} | "
                f"{self.seconds - self.floor:+.1f} | {self.rss_added / GB:.1f} | "
                f"{self.ram_side / GB:.1f} | {ratio} | {over:+.1f} | {self.vram / GB:.1f} | {self.check} | "
                f"{self.breakdown} |")


HEADER = ("| load | time s | x disk floor | s over floor | peak RSS added GB | plan RAM side GB | RSS / RAM side | "
          "RSS - (RAM side + 1 block) GB | peak VRAM GB | logits | where the time went (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def logits(model) -> torch.Tensor:
    ids = torch.arange(3, 15).remainder(model.config.vocab_size)[None].to(model.model.wte.weight.device)
    with torch.inference_mode():
        return model(input_ids=ids).logits.float().cpu()


def ram_side(loaded) -> int:
    """Bytes the placement keeps in host RAM: streamed blocks' pinned buffers (ours / earlier path),
    accelerate's CPU-offloaded modules."""
    if loaded.residency is not None and loaded.residency.plan is not None:
        return int(loaded.residency.plan.streamed_bytes)
    dmap = getattr(loaded.model, "hf_device_map", {}) or {}
    cpu = [k for k, v in dmap.items() if v in ("cpu", "disk")]
    total = 0
    for name, p in loaded.model.state_dict().items():
        if any(name == k or name.startswith(k + ".") for k in cpu):
            total += p.numel() * p.element_size()
    return total


def free(loaded) -> None:
    if loaded is not None and loaded.residency is not None:
        loaded.residency.close()
    if loaded is not None:
        loaded.residency = None
        loaded.model = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    from hunyuan_image3.memory import stats

    stats.malloc_trim()


def run_load(name: str, files: list[Path], floors: Floors, label: str, load: Callable[[], object],
             after: Callable[[object], None] | None = None) -> tuple[Row, torch.Tensor]:
    """One load, page-cache cold, between two floor reads of its files (``Floors``)."""
    before = floors.before(files, label)
    gc.collect()
    torch.cuda.empty_cache()
    drop_caches(files)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        loaded = load()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    vram = torch.cuda.max_memory_allocated() - base
    block = max(loaded.residency.block_bytes) if loaded.residency is not None else 0
    side = ram_side(loaded)
    st = getattr(loaded, "load_stats", None)
    breakdown = st.compact() if st is not None else ""
    outside = seconds - loaded.load_seconds  # between load_model's return and the GPU being idle
    if abs(outside) >= 0.05:
        breakdown += f", after return {outside:.2f}"
    if after is not None:
        after(loaded)
    out = logits(loaded.model)
    free(loaded)
    after_floor = floors.read(files, label)
    breakdown += f", floors {before:.1f} / {after_floor:.1f} s"
    row = Row(name, seconds, (before + after_floor) / 2, rss.added, side, block, vram, breakdown=breakdown)
    return row, out


def choose_layers(root: Path, asked: int | None) -> int:
    """--layers, else as many as the free space of ``root`` holds: the BF16 set and the int8 copy
    (the larger copy; each copy is deleted after its rows) with a margin of 5% of the disk + 4 GB,
    capped by the time limit; at least 4. Prints the count and why."""
    if asked is not None:
        say(f"layers: {asked} (--layers)")
        return asked
    usage = shutil.disk_usage(root)
    ours = sum(f.stat().st_size for d in root.glob("HunyuanImage-3-bench-L*") for f in d.rglob("*")
               if f.is_file())  # an earlier run's checkpoints: reused or replaced
    free = usage.free + ours
    margin = 0.05 * usage.total + 4 * GB
    per_layer = LAYER_BYTES["bf16"] + max(LAYER_BYTES["int8"], LAYER_BYTES["nf4"])
    by_disk = int((free - margin - 2 * NON_LAYER_BYTES) // per_layer)
    by_time = int((TIME_LIMIT - 30.0) // SECONDS_PER_LAYER)
    n = max(4, min(by_disk, by_time))
    say(f"layers: {n} (free space {free / GB:.1f} GB of {usage.total / GB:.1f} GB incl. {ours / GB:.1f} GB of "
        f"earlier bench files in {root}; margin {margin / GB:.1f} GB; a layer needs {per_layer / GB:.2f} GB "
        f"(BF16 + int8 copy at once) -> {by_disk} fit; the {TIME_LIMIT / 60:.0f}-minute limit allows {by_time})")
    if by_disk < 4:
        say(f"WARNING: only {by_disk} layers fit the free space with the margin; running 4 anyway")
    return n


def remove_other_checkpoints(root: Path, keep: Path) -> None:
    """Synthetic checkpoints of another layer count (and their copies) left by an earlier run."""
    for d in root.glob("HunyuanImage-3-bench-L*"):
        if d.is_dir() and d != keep:
            shutil.rmtree(d, ignore_errors=True)


# -- main -------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="real-size layers (default: from the free space)")
    ap.add_argument("--dir", default=os.environ.get("HY3_BENCH_DIR", "/tmp/hy3_load_bench"))
    ap.add_argument("--int8-format", choices=("w8a16", "bnb"), default="w8a16",
                    help="INT8 kernels of the int8 rows (the INT8 loader's default is w8a16)")
    ap.add_argument("--today-int8", action="store_true",
                    help="also the earlier path for int8 smart (quantizes on the CPU: slow)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--prequantized-only", action="store_true",
                    help="only what the pre-quantized rows need: the BF16 floor, each resident load from BF16 that "
                         "writes the copy, the copy's floor and its two loads (a shorter GPU run)")
    args = ap.parse_args()
    if not start_bench("bench/load.py"):
        return 0
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.hunyuan_loader.load.pipeline import load_model, save_quantized_copy

    dev = torch.device("cuda", 0)
    torch.empty(1, device=dev)
    torch.empty(1, pin_memory=True)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    n = choose_layers(root, args.layers)
    half = n // 2
    remove_other_checkpoints(root, root / f"HunyuanImage-3-bench-L{n}")
    ckpt = build_checkpoint(root, n, dev)
    # imports and the remote code's first import are not part of a load (ComfyUI has them already)
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path, validate_checkpoint

    link = str(loadable_path(validate_checkpoint(ckpt)))
    get_class_from_dynamic_module(AutoConfig.from_pretrained(link, trust_remote_code=True).auto_map[
        "AutoModelForCausalLM"], link)
    copies = {q: root / f"{ckpt.name}-{q.upper()}" for q in ("int8", "nf4")}
    for c in copies.values():
        shutil.rmtree(c, ignore_errors=True)
    bf16_files = weight_files(ckpt)
    method = drop_caches(bf16_files)
    say(f"page cache: {method}")
    floors = Floors()
    floor = floors.read(bf16_files, "bf16")
    nbytes = sum(f.stat().st_size for f in bf16_files)
    fmt = args.int8_format
    rows: list[Row] = []
    refs: dict[str, torch.Tensor] = {}

    def spec(path: Path, quant: str, smart: bool = False, **kw) -> LoadSpec:
        if smart:
            kw.setdefault("offload", "smart")
        return LoadSpec(str(path), quant=quant, int8_format=fmt, multi_gpu="off", **kw)  # one GPU

    def record(row: Row, out: torch.Tensor, ref_key: str | None, key: str | None = None) -> None:
        if ref_key is not None and ref_key in refs:
            row.check = "= " + ref_key if torch.equal(out, refs[ref_key]) else "DIFFERS from " + ref_key
        if key is not None:
            refs.setdefault(key, out)
        rows.append(row)
        say(row.line())

    print(HEADER, flush=True)

    def saver(quant: str) -> Callable[[object], None]:
        return lambda loaded: save_quantized_copy(loaded, copies[quant])

    os.environ["HUNYUAN_MIN_STREAMED_BLOCKS"] = str(half)  # smart rows: half of the blocks stream
    settings_refresh()
    # Rows that read the BF16 files come first; then per format: from BF16 (resident writes the copy),
    # the copy's floor and loads, and the copy is deleted, so at most one copy is on disk at a time.
    only_copies = args.prequantized_only
    if not only_copies:
        r, out = run_load("ours bf16 resident", bf16_files, floors, "bf16", lambda: load_model(spec(ckpt, "bf16")))
        record(r, out, None, "bf16")
        r, out = run_load(f"ours bf16 smart ({half}/{n} streamed)", bf16_files, floors, "bf16",
                          lambda: load_model(spec(ckpt, "bf16", smart=True)))
        record(r, out, "bf16")
    today = [] if only_copies else ["bf16"] + (["int8"] if args.today_int8 else [])
    for quant in today:
        label = quant if quant != "int8" else f"int8 {fmt}"
        r, out = run_load(f"earlier path {label} smart ({half}/{n} streamed)", bf16_files, floors, "bf16",
                          lambda q=quant: load_model(spec(ckpt, q, smart=True), engine="from_pretrained"))
        r.order = 10
        record(r, out, quant)
    os.environ.pop("HUNYUAN_MIN_STREAMED_BLOCKS", None)
    settings_refresh()
    # accelerate: device_map="auto" within a budget that holds about half of the blocks
    from hunyuan_image3.hunyuan_loader.checkpoint.layout import block_of, read_layout

    sizes: dict[int | None, int] = {}
    for name, e in read_layout(bf16_files).items():
        sizes[block_of(name)] = sizes.get(block_of(name), 0) + e.nbytes
    other = sizes.pop(None, 0)
    budget = (other + (n - half) * max(sizes.values())) / GIB * 1.05
    if not only_copies:
        r, out = run_load(f"accelerate device_map=auto bf16 (budget {budget:.0f} GiB)", bf16_files, floors, "bf16",
                          lambda: load_model(spec(ckpt, "bf16", offload="accelerate", vram_budget_gb=budget)))
        r.order = 11
        record(r, out, "bf16")
    os.environ["HUNYUAN_MIN_STREAMED_BLOCKS"] = str(half)
    settings_refresh()
    for k, quant in enumerate(("int8", "nf4")):
        label = quant if quant != "int8" else f"int8 {fmt}"
        r, out = run_load(f"ours {label} resident", bf16_files, floors, "bf16", lambda q=quant: load_model(spec(ckpt, q)),
                          after=saver(quant))
        r.order = 1 + k
        record(r, out, None, quant)
        if not only_copies:
            r, out = run_load(f"ours {label} smart ({half}/{n} streamed)", bf16_files, floors, "bf16",
                              lambda q=quant: load_model(spec(ckpt, q, smart=True)))
            r.order = 1 + k
            record(r, out, quant)
        files = weight_files(copies[quant])
        for row_name, smart in ((f"ours {label} pre-quantized resident", False),
                                (f"ours {label} pre-quantized smart ({half}/{n} streamed)", True)):
            r, out = run_load(row_name, files, floors, f"{quant} copy",
                              lambda q=quant, sm=smart: load_model(spec(copies[q], q, smart=sm)))
            r.order = 3 + k
            record(r, out, quant)
        if not args.keep:
            shutil.rmtree(copies[quant], ignore_errors=True)
    os.environ.pop("HUNYUAN_MIN_STREAMED_BLOCKS", None)
    settings_refresh()
    rows.sort(key=lambda row: row.order)  # the table in the earlier order: bf16, int8, nf4, copies, others

    print(f"\n{n} real-size layers ({nbytes / GB:.1f} GB BF16 on disk), disk floor {floor:.1f} s "
          f"({nbytes / GB / floor:.2f} GB/s, page cache dropped by {method} before every load); "
          f"int8 = {fmt}; smart = {half} of {n} blocks streamed.")
    print(HEADER)
    for row in rows:
        print(row.line())
    print("\nTargets: bf16 and pre-quantized <= 1.2x their floor; int8/nf4 from BF16 <= 1.4x; smart peak RSS <= "
          "RAM side + 1 block + 2 GB (the 'RSS - (RAM side + 1 block)' column <= +2.0).")
    print("Where the time went: load_model's phases (val: checkpoint checks and headers; skel: the empty model "
          "from the remote code; chk: quantized-module checks; plan; read: reading and placing every tensor, with "
          "the reader's rate from its first byte to its last and the time placing waited on it; fin: "
          "generation_config, quantizer post-processing; adopt: the residency manager takes the placed blocks; "
          "tok: tokenizer; moe: MoE dispatch; other: the rest of load_model), the ring's allocation (made "
          "ahead while the skeleton is built, or inside read), 'read from before skel' (a load that quantizes nothing: "
          "the reader started once the plan from the headers passed, and read while the skeleton was built), and the time between load_model's return and the "
          "GPU being idle; floors: the plain reads right before and after the load, whose mean the row is divided by. "
          "Every floor read (s): " + "; ".join(f"{q}: {', '.join(f'{t:.1f}' for t in ts)}"
                                            for q, ts in floors.seen.items()) + ".")
    if not args.keep:
        for c in copies.values():
            shutil.rmtree(c, ignore_errors=True)
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
