"""`plan --gpu NAME` projects each card with its own compute and PCIe link (cli/gpus.py), and the
README's guide per card is `plan --readme-block guide`'s output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.cli import card_guide, gpus
from hunyuan_image3.hunyuan_loader.cli import card_plan as cp
from hunyuan_image3.hunyuan_loader.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_readme_guide_is_the_commands_output(capsys) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- gpu-guide:start[^>]*-->\n(.*?)\n<!-- gpu-guide:end -->", text, re.S)
    assert match, "README.md lacks the <!-- gpu-guide:start --> ... <!-- gpu-guide:end --> block"
    rc, out, _ = _plan(capsys, "--readme-block", "guide")
    assert rc == 0 and match.group(1).strip() == out.strip(), (
        "README's guide per card is stale: paste `python -m hunyuan_loader plan --readme-block guide`"
    )


@pytest.mark.parametrize(("name", "card"), [
    ("4090", "RTX 4090"), ("RTX 4090", "RTX 4090"), ("5090", "RTX 5090"), ("3090", "RTX 3090"),
    ("A6000", "RTX A6000"), ("6000 Ada", "RTX 6000 Ada"), ("RTX PRO 6000", "RTX PRO 6000"),
    ("rtx-pro-6000", "RTX PRO 6000"), ("H100", "H100"), ("h200", "H200"), ("L40S", "L40S"),
])
def test_card_names(name: str, card: str) -> None:
    found = gpus.find_gpu(name)
    assert found is not None and found.name == card


def test_each_card_gets_its_own_compute_and_link() -> None:
    h200, rtx4090 = gpus.find_gpu("h200"), gpus.find_gpu("4090")
    assert cp.figures_for_gpu(h200) == cp.H200_BENCH  # the bench's own card: the measured figures
    fig = cp.figures_for_gpu(rtx4090)
    for quant, seconds in cp.H200_BENCH.block_seconds.items():
        assert fig.block_seconds[quant] == pytest.approx(seconds * h200.tflops / rtx4090.tflops)
    assert fig.copy_bytes_per_s == pytest.approx(cp.H200_BENCH.copy_bytes_per_s * 31.5 / 63.0)  # PCIe 4 vs 5
    sizes = cp.real_model_sizes()
    card = cp.Card(24, 128)
    on_h200 = {(o.quant, o.mode): o for o in cp.plan_card(sizes, card)}
    on_4090 = {(o.quant, o.mode): o for o in cp.plan_card(sizes, card, figures=fig)}
    streamed = on_4090[("nf4", "smart")]
    assert streamed.fits and streamed.step_seconds > 4 * on_h200[("nf4", "smart")].step_seconds


def test_plan_gpu_prints_the_card_and_its_scaling(capsys) -> None:
    rc, out, err = _plan(capsys, "--gpu", "4090")
    assert rc == 0, err
    assert out.startswith("GPU: RTX 4090, 24 GB, 165.2 dense BF16 TFLOPS, PCIe 4.0 x16")
    assert "RAM not given (planned as no limit)" in out and "scaled to the RTX 4090: compute x 5.99" in out
    assert "pinned copies at 27.6 GB/s" in out
    rc, limited, _ = _plan(capsys, "--gpu", "4090", "--ram-gb", "64")
    assert rc == 0 and "| BF16 | smart | no (RAM:" in limited and "64 GB RAM" in limited


def test_plan_unknown_gpu_is_one_line(capsys) -> None:
    rc, _, err = _plan(capsys, "--gpu", "9999")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--gpu '9999' is not a card plan knows (RTX 3090, RTX 4090" in err


def test_distil_runs_one_cfg_half() -> None:
    gpu = gpus.find_gpu("6000 Ada")
    advice = card_guide.advise(gpu, 128)
    base, distil = advice.best, advice.distil
    assert distil.step_seconds < base.step_seconds  # half the tokens per step
    figures, sizes = cp.figures_for_gpu(gpu), cp.real_model_sizes()
    both = cp.plan_option(sizes, cp.Card(64, 128), "nf4", "disabled", figures)  # NF4 resident with room at 1 MP
    one = cp.plan_option(sizes, cp.Card(64, 128, cfg=False), "nf4", "disabled", figures)
    assert one.step_seconds < 0.55 * both.step_seconds  # resident: compute-bound, about half the tokens
    if (distil.quant, distil.mode) != (base.quant, base.mode):  # the guide then names Distil's own loader
        row = next(line for line in card_guide.readme_guide().splitlines() if line.startswith("| RTX 6000 Ada |"))
        assert f"{distil.quant.upper()}, {distil.mode}" in row.split("|")[-2]
