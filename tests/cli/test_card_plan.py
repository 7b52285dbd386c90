"""`python -m hunyuan_loader plan`: weight sizes per format, the loaders' own planner, the
projection from the bench figures, and the README table it generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.cli import card_plan as cp
from hunyuan_image3.hunyuan_loader.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_readme_table_is_the_commands_output(capsys) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- plan-table:start[^>]*-->\n(.*?)\n<!-- plan-table:end -->", text, re.S)
    assert match, "README.md lacks the <!-- plan-table:start --> ... <!-- plan-table:end --> block"
    rc, out, _ = _plan(capsys, "--readme-table")
    assert rc == 0
    assert match.group(1).strip() == out.strip(), (
        "README's 'Which loader for my card' table is stale: paste `python -m hunyuan_loader plan --readme-table`"
    )


def test_real_model_sizes_match_the_published_figures() -> None:
    sizes = cp.real_model_sizes()
    assert len(sizes.block_bytes["bf16"]) == 32
    block = sizes.block_bytes["bf16"][0]
    assert 4.9 * GB < block < 5.1 * GB  # ~5 GB per decoder block in BF16 (HUNYUAN3_FACTS)
    assert 160 * GB <= sizes.total("bf16") <= 170 * GB  # the 160-170 GB BF16 checkpoint
    assert 80 * GB <= sizes.total("int8") <= 90 * GB  # community INT8 ~81 GB (+ what stays bf16)
    assert 40 * GB <= sizes.total("nf4") <= 50 * GB  # community NF4 ~40-48 GB


@pytest.mark.parametrize(("quant", "int8_format"), [("bf16", "w8a16"), ("int8", "w8a16"), ("int8", "bnb"),
                                                   ("nf4", "w8a16")])
def test_checkpoint_sizes_equal_what_the_loader_puts_in_memory(
    base_checkpoint: Path, quant: str, int8_format: str, cache, one_thread
) -> None:
    """The plan's bytes per block, from the headers alone, equal the loaded model's (incl. quant state)."""
    from hunyuan_image3.hunyuan_loader.core.spec import LoadSpec
    from hunyuan_image3.memory.residency import module_weight_bytes

    sizes = cp.checkpoint_sizes(base_checkpoint, int8_format)
    cache.load(LoadSpec(str(base_checkpoint), quant=quant, int8_format=int8_format))
    model = cache.loaded.model
    assert sizes.block_bytes[quant] == tuple(module_weight_bytes(b) for b in model.model.layers)
    assert sizes.total(quant) == module_weight_bytes(model)


def test_projection_reproduces_the_measured_bench_step() -> None:
    """bench/offload.py: 10 layers, 4 streamed blocks of ~4.99 GB, measured 0.364 s/step."""
    figures = cp.H200_BENCH
    block = cp.real_model_sizes().block_bytes["bf16"][0]
    step = cp.project_step_seconds(10, 4 * block, figures.block_seconds["bf16"], figures.copy_bytes_per_s,
                                   figures.stream_overhead)
    assert step == pytest.approx(0.364, rel=0.03)
    assert cp.project_step_seconds(10, 0, figures.block_seconds["bf16"], 1.0, 9.0) == pytest.approx(0.165)


def test_options_follow_the_loaders_planner() -> None:
    sizes = cp.real_model_sizes()
    small = {(o.quant, o.mode): o for o in cp.plan_card(sizes, cp.Card(24, 64))}
    assert not small["bf16", "disabled"].fits and "VRAM" in small["bf16", "disabled"].problem
    assert not small["bf16", "smart"].fits and "RAM" in small["bf16", "smart"].problem  # ~144 GB to pin
    assert small["nf4", "smart"].fits and small["nf4", "smart"].plan.gpu_bytes <= 24 * cp.GIB
    big = {(o.quant, o.mode): o for o in cp.plan_card(sizes, cp.Card(96, 128, budget_gib=80))}
    assert big["int8", "disabled"].fits and big["int8", "disabled"].resident == "32/32"
    assert big["bf16", "smart"].fits and 0 < len(big["bf16", "smart"].plan.streamed) < 32
    # a smaller budget keeps fewer blocks on the GPU and pins more RAM
    assert len(big["bf16", "budget"].plan.resident) < len(big["bf16", "smart"].plan.resident)
    assert big["bf16", "budget"].pinned_bytes > big["bf16", "smart"].pinned_bytes
    # streamed BF16 is copy-bound: slower than all-resident NF4 on the same card
    assert big["bf16", "smart"].step_seconds > big["nf4", "disabled"].step_seconds


def test_plan_command_prints_the_options_and_the_sources(capsys) -> None:
    rc, out, _ = _plan(capsys, "--vram-gb", "24", "--ram-gb", "64", "--resolution", "1280x768")
    assert rc == 0
    for text in ("| NF4 | smart | yes |", "PROJECTION", "55.3 GB/s", "0.165 s", "Soft Unload parks", "1280x768",
                 "fastest that fits: NF4"):
        assert text in out, out


def test_plan_for_a_checkpoint_folder(capsys, base_checkpoint: Path) -> None:
    rc, out, _ = _plan(capsys, "--vram-gb", "4", "--ram-gb", "16", "--model", str(base_checkpoint), "--quant", "int8")
    assert rc == 0 and "safetensors headers" in out and "| INT8 | disabled | yes | 4/4 |" in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vram-gb", "24"], "plan needs --ram-gb"),
        (["--vram-gb", "0", "--ram-gb", "64"], "--vram-gb must be positive"),
        (["--vram-gb", "24", "--ram-gb", "64", "--resolution", "huge"], "resolution 'huge' is not WIDTHxHEIGHT"),
        (["--vram-gb", "24", "--ram-gb", "64", "--model", "/no/such/folder"], "Model folder not found"),
    ],
)
def test_plan_bad_input_is_one_line(capsys, args: list[str], message: str) -> None:
    rc, out, err = _plan(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_int8_w8a16_plans_room_for_the_grouped_expert_workspace() -> None:
    """W8A16 experts run together hold a chunk's activations and the dequantized-weight scratch
    (moe_grouped.workspace_bytes_for): the plan keeps room for it for INT8 W8A16 only."""
    from hunyuan_image3.hunyuan_loader.cli.card_plan import moe_workspace_bytes, real_model_sizes
    from hunyuan_image3.hunyuan_loader.hooks.moe_grouped import GROUPED_ROWS, SCRATCH_BYTES

    sizes = real_model_sizes()
    expected = GROUPED_ROWS * (2 * 4096 + 3 * 3072) * 2 + SCRATCH_BYTES
    assert moe_workspace_bytes(sizes, "int8") == expected
    assert 1.0e9 < expected < 1.2e9
    assert moe_workspace_bytes(sizes, "bf16") == moe_workspace_bytes(sizes, "nf4") == 0
    assert moe_workspace_bytes(real_model_sizes(int8_format="bnb"), "int8") == 0
