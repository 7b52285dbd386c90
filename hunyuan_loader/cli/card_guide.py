"""The README's guide per card (`plan --readme-block guide`): for each common GPU (gpus.py), the fastest
loader and offload mode that fits at 1024x1024, the RAM and disk it needs and the projected minutes
per image for base / Instruct (50 steps, both CFG halves) and Instruct-Distil (8 steps, one half).
Everything comes from card_plan's planner and projection; tests/cli/test_card_guide.py compares the
README with this output."""

from __future__ import annotations

from dataclasses import dataclass

from . import card_plan as cp
from .gpus import GPUS, Gpu

BASE_STEPS, DISTIL_STEPS = 50, 8  # the checkpoints' generation_config defaults (model/variants.py)


GUIDE_RAM_GIB = (64, 128)  # the machine RAM each card is planned with
# (Hugging Face repository, folder under ComfyUI/models/HunyuanImage-3, what it is). Any folder name works:
# the loaders list every folder with a config.json there and read the variant from config.json.
CHECKPOINTS = (
    ("tencent/HunyuanImage-3.0", "HunyuanImage-3", "base: text to image"),
    ("tencent/HunyuanImage-3.0-Instruct", "HunyuanImage-3-Instruct",
     "Instruct: text to image, edit (1 reference image), fusion (2-3), think / recaption"),
    ("tencent/HunyuanImage-3.0-Instruct-Distil", "HunyuanImage-3-Instruct-Distil", "Instruct-Distil: the same in 8 steps"),
)


@dataclass(frozen=True)
class CardAdvice:
    gpu: Gpu
    ram_gib: float
    best: cp.Option | None  # base / Instruct: the fastest option that fits the card's VRAM and this RAM
    distil: cp.Option | None  # Instruct-Distil (one CFG half per step)

    @property
    def ram_needed_gib(self) -> float:
        """Pinned streamed blocks + the reserve for the OS and ComfyUI."""
        return 0.0 if self.best is None else self.best.pinned_bytes / cp.GIB + cp.RAM_RESERVE_GIB


def advise(gpu: Gpu, ram_gib: float, sizes: cp.WeightSizes | None = None) -> CardAdvice:
    sizes = sizes or cp.real_model_sizes()
    figures = cp.figures_for_gpu(gpu)
    best = cp.best_option(cp.plan_card(sizes, cp.Card(gpu.vram_gb, ram_gib), figures=figures))
    distil = cp.best_option(cp.plan_card(sizes, cp.Card(gpu.vram_gb, ram_gib, cfg=False), figures=figures))
    return CardAdvice(gpu, ram_gib, best, distil)


def image_time(option: cp.Option | None, steps: int) -> str:
    """Projected time of the diffusion steps of one image: "~25 s" or "~3.1 min"."""
    if option is None or option.step_seconds is None:
        return ""
    seconds = steps * option.step_seconds
    return f"~{seconds:.0f} s" if seconds < 90 else f"~{seconds / 60:.1f} min"


def _mode(option: cp.Option | None) -> str:
    if option is None:
        return "nothing fits"
    loader = "INT8 (W8A16)" if option.quant == "int8" else option.quant.upper()
    return f"{loader}, {option.mode} ({option.resident} blocks on GPU)"


def readme_guide(sizes: cp.WeightSizes | None = None) -> str:
    sizes = sizes or cp.real_model_sizes()
    lines = [
        "| card (`plan --gpu`) | VRAM | RAM | fastest loader that fits | RAM it needs | s/step | base, Instruct "
        f"({BASE_STEPS} steps) | Distil ({DISTIL_STEPS} steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gpu in GPUS:
        for ram in GUIDE_RAM_GIB:
            a = advise(gpu, ram, sizes)
            step = "" if a.best is None or a.best.step_seconds is None else f"~{a.best.step_seconds:.2f}"
            need = "" if a.best is None else f"{a.ram_needed_gib:.0f} GB"
            distil = image_time(a.distil, DISTIL_STEPS)
            if a.distil is not None and a.best is not None and (a.distil.quant, a.distil.mode) != (
                    a.best.quant, a.best.mode):  # one CFG half: another loader can be the fastest
                distil += f" ({_mode(a.distil)}, RAM {a.distil.pinned_bytes / cp.GIB + cp.RAM_RESERVE_GIB:.0f} GB)"
            lines.append(f"| {gpu.name} | {gpu.vram_gb:g} GB | {ram} GB | {_mode(a.best)} | {need} | {step} | "
                         f"{image_time(a.best, BASE_STEPS)} | {distil} |")
    soft = ", ".join(f"{q.upper()} {sizes.total(q) / cp.GIB:.0f} GB" for q in cp.QUANT_ORDER)
    copies = " / ".join(f"{sizes.total(q) / cp.GIB:.0f}" for q in ("int8", "nf4"))
    lines += [
        "",
        f"1024x1024, gather_scatter MoE; base and Instruct run both CFG halves in every step, Instruct-Distil "
        "one; Instruct's think / recaption text adds its own time. RAM it needs: the streamed blocks, held in "
        f"pinned RAM, + {cp.RAM_RESERVE_GIB:.0f} GB for the OS and ComfyUI; Soft Unload parks every weight in RAM "
        f"as well ({soft}). Disk: {sizes.total('bf16') / cp.GIB:.0f} GB for each BF16 download, which every loader "
        "reads (INT8 and NF4 quantize it while loading), + "
        f"{copies} GB for a pre-quantized INT8 / NF4 copy if you save one (it loads faster; the BF16 folder may "
        "then go). GB = 2^30 bytes. Times are PROJECTIONS from one H200's bench figures scaled by each card's "
        "dense BF16 TFLOPS and PCIe link (`python -m hunyuan_loader plan --gpu NAME --ram-gb N` shows the "
        "scaling and every loader), not measurements on that card.",
        "",
        "Which folder goes where (each appears in the loaders' `model_name` list; the variant is read from its "
        "`config.json`, so the names are only a suggestion):",
        "",
        "| checkpoint | download into | what it does |",
        "|---|---|---|",
    ]
    lines += [f"| `{repo}` | `ComfyUI/models/HunyuanImage-3/{folder}` | {what} |" for repo, folder, what in CHECKPOINTS]
    lines += [
        "",
        "```bash",
        *(f"huggingface-cli download {repo} --local-dir ComfyUI/models/HunyuanImage-3/{folder}"
          for repo, folder, _ in CHECKPOINTS),
        "```",
        "A pre-quantized copy goes beside them (the loaders' `save_quantized_copy` writes "
        "`HunyuanImage-3-INT8` / `-NF4` there). The command line takes the folder itself: "
        "`./dev demo --model ComfyUI/models/HunyuanImage-3/HunyuanImage-3-Instruct`.",
    ]
    return "\n".join(lines)
