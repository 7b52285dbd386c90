"""Common GPUs for `plan --gpu NAME`: memory, dense BF16 tensor compute and the host link.

Plain data (no torch): the command line lists the names in its ``--help``. Figures are the
vendors' published ones: dense BF16 tensor TFLOPS with FP32 accumulation (what torch's bf16
matmuls use; GeForce cards run that at half their FP16-accumulate rate), no sparsity; the PCIe
generation and width of the card's host link. The projection (card_plan.py) scales the H200
bench's compute by ``tflops / H200.tflops`` and its pinned copy rate by the link's bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

# PCIe x16 bandwidth per direction, GB/s (10^9 bytes), after the 128b/130b line encoding.
PCIE_X16_GBPS = {3: 15.8, 4: 31.5, 5: 63.0}


@dataclass(frozen=True)
class Gpu:
    name: str
    aliases: tuple[str, ...]  # what `--gpu` accepts besides the name (lower case, no spaces)
    vram_gb: float  # as sold (the planner reads it as GiB, like --vram-gb)
    tflops: float  # dense BF16 tensor, FP32 accumulate
    pcie_gen: int

    @property
    def link_gbps(self) -> float:
        return PCIE_X16_GBPS[self.pcie_gen]


GPUS: tuple[Gpu, ...] = (
    Gpu("RTX 3090", ("3090", "rtx3090", "3090ti"), 24, 71.0, 4),
    Gpu("RTX 4090", ("4090", "rtx4090"), 24, 165.2, 4),
    Gpu("RTX 5090", ("5090", "rtx5090"), 32, 209.5, 5),
    Gpu("RTX A6000", ("a6000", "rtxa6000"), 48, 154.8, 4),
    Gpu("RTX 6000 Ada", ("6000ada", "rtx6000ada"), 48, 364.2, 4),
    Gpu("L40S", ("l40s",), 48, 362.1, 4),
    Gpu("RTX PRO 6000", ("pro6000", "rtxpro6000", "rtxpro6000blackwell"), 96, 503.8, 5),
    Gpu("A100 80GB", ("a100", "a10080gb"), 80, 312.0, 4),
    Gpu("H100", ("h100", "h100sxm"), 80, 989.4, 5),
    Gpu("H200", ("h200",), 141, 989.4, 5),
)
BENCH_GPU = "H200"  # the card the bench figures were measured on


def _key(text: str) -> str:
    return "".join(text.lower().split()).replace("-", "").replace("_", "")


def find_gpu(name: str) -> Gpu | None:
    """The card called ``name`` ("4090", "RTX 4090", "6000 Ada", "rtx-pro-6000"), or None."""
    key = _key(name)
    for gpu in GPUS:
        if key == _key(gpu.name) or key in gpu.aliases:
            return gpu
    return None


def gpu_names() -> str:
    return ", ".join(gpu.name for gpu in GPUS)


def bench_gpu() -> Gpu:
    gpu = find_gpu(BENCH_GPU)
    assert gpu is not None
    return gpu
