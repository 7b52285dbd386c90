"""The CLI (the demo of the Quick start): every bad input is one `error: ...` line with exit
code 2 BEFORE anything loads; the demo reuses one cached test checkpoint and says its image
is noise; library noise stays hidden unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_model import poisoned_copy
from PIL import Image

from hunyuan_image3.hunyuan_loader.cli import demo
from hunyuan_image3.hunyuan_loader.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "hf" / "modules"),
                XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"))


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hunyuan_loader", *args], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def poisoned_checkpoint(tmp_path_factory: pytest.TempPathFactory, base_checkpoint: Path) -> Path:
    """A valid-looking base checkpoint whose model code raises on import: any load shows POISON."""
    return poisoned_copy(base_checkpoint, tmp_path_factory.mktemp("poisoned") / "HunyuanImage-3-poisoned")


def test_the_poison_works(poisoned_checkpoint: Path, tmp_path: Path, cache) -> None:
    """Control: good inputs do reach the model code, so the checks below can fail."""
    with pytest.raises(Exception, match="POISON"):
        cli.main(["generate", "--model", str(poisoned_checkpoint), "--steps", "1", "--out", str(tmp_path / "x.png")])


BAD_INPUTS = [
    (["--resolution", "999x999"], "resolution 999x999 is not one of this model's 33 sizes; the nearest are 1024x1024"),
    (["--resolution", "1280x720"], "not one of this model's 33 sizes"),  # an Instruct-only size on base
    (["--resolution", "abc"], "resolution 'abc' is not WIDTHxHEIGHT"),
    (["--width", "512"], "--width applies only with --resolution custom"),
    (["--width", "512", "--height", "512", "--resolution", "auto"], "--width and --height apply only with"),
    (["--resolution", "custom", "--width", "1000"], "width 1000 is not a multiple of 16: use 992 or 1008"),
    (["--out", "{tmp}/no/such/dir/x.png"], "the folder {tmp}/no/such/dir does not exist"),
    (["--out", "{tmp}"], "is a folder: give a file name"),
    (["--out", "{tmp}/x.txt"], "'.txt' is not an image format"),
    (["--steps", "0"], "steps must be between 1 and 200"),
    (["--steps", "500"], "steps must be between 1 and 200"),
    (["--guidance", "1.0"], "guidance_scale 1 does not work with base checkpoints"),
    (["--guidance", "-2"], "guidance_scale must be 0 or more"),
    (["--prompt", "  "], "The prompt is empty"),
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--budget-gb", "10"], "--budget-gb applies with --offload budget, smart or accelerate"),
    (["--offload", "budget", "--budget-gb", "0"], "vram_budget_gb must be positive"),
    (["--variant", "instruct"], "with --model the variant is read from its config.json"),
    (["--step-cache", "taylor", "--cache-first-steps", "1"], "cache_first_steps must be at least 2"),
    (["--step-cache", "taylor", "--cache-interval", "0"], "cache_interval must be between 1 and 50"),
    (["--step-cache", "taylor", "--steps", "2"], "cache_first_steps (3) is more than the steps (2): lower it"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_any_load(
    args: list[str], message: str, poisoned_checkpoint: Path, tmp_path: Path, cache, capsys
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a == "--out" for a in args):
        args += ["--out", str(tmp_path / "x.png")]
    loads = cache.load_count
    rc = cli.main(["generate", "--model", str(poisoned_checkpoint), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "POISON" not in err and cache.load_count == loads and cache.loaded is None
    assert not (tmp_path / "x.png").exists()


def test_usage_errors_are_one_line(tmp_path: Path, capsys) -> None:
    for argv, message in [
        (["generate", "--variant", "foo"], "argument --variant: invalid choice: 'foo'"),
        (["generate", "--quant", "fp8"], "argument --quant: invalid choice: 'fp8'"),
        (["generate", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bad_output_folder_fails_before_the_demo_builds_or_loads(tmp_path: Path) -> None:
    """Through the real entry point: exit 2, one line, no traceback, nothing built or loaded."""
    res = _run(["generate", "--out", str(tmp_path / "no" / "such" / "dir" / "x.png")], tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "xdg").exists()  # the demo's test checkpoint was not even built


def test_missing_model_folder(tmp_path: Path) -> None:
    res = _run(["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")], tmp_path)
    assert res.returncode == 2
    assert "Model folder not found" in res.stderr and "models/HunyuanImage-3" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_generates_reports_and_reuses_one_cached_checkpoint(tmp_path: Path) -> None:
    out_png = tmp_path / "demo.png"
    first = _run(["generate", "--steps", "2", "--resolution", "1280x768", "--quant", "int8", "--out", str(out_png)],
                 tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for label in ("load:", "generate:", "peak RAM:", "test checkpoint:", "noise by design", "--model"):
        assert label in first.stdout, first.stdout
    assert Image.open(out_png).size == (1280, 768)
    # quiet by default: no library note that does not concern the user (tests/core/test_quiet.py has each one)
    assert "bitsandbytes" not in first.stderr and "INFO" not in first.stderr, first.stderr

    folder = next(line.split(": ", 1)[1] for line in first.stdout.splitlines() if line.startswith("test checkpoint:"))
    assert Path(folder).parent == tmp_path / "xdg" / "hunyuan_image3"
    stamp = (Path(folder) / "config.json").stat().st_mtime_ns
    second = _run(["generate", "--steps", "1", "--resolution", "1024x1024", "--quant", "int8", "--verbose",
                   "--out", str(tmp_path / "again.png")], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"test checkpoint: {folder}" in second.stdout
    assert (Path(folder) / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert "INFO hunyuan_image3.hunyuan_loader" in second.stderr  # --verbose: info logs too
    assert [p.name for p in (tmp_path / "xdg" / "hunyuan_image3").iterdir()] == [Path(folder).name]
    assert not list((tmp_path / "tmp").glob("hy3-demo-*"))


def test_cached_test_model_is_rebuilt_when_the_builder_changes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "hunyuan_image3"
    stale = root / "test-model-base-000000000000"
    stale.mkdir(parents=True)
    first = demo.cached_test_model("base")
    assert first.name == f"test-model-base-{demo.builder_hash()}" and (first / "config.json").is_file()
    assert not stale.exists()
    assert demo.cached_test_model("base") == first
    monkeypatch.setattr(demo, "builder_hash", lambda: "feedfacecafe")
    second = demo.cached_test_model("base")
    assert second.name == "test-model-base-feedfacecafe" and (second / "config.json").is_file()
    assert not first.exists() and sorted(p.name for p in root.iterdir()) == [second.name]


def test_make_test_model(tmp_path: Path) -> None:
    res = _run(["make-test-model", str(tmp_path / "ckpt"), "--variant", "instruct"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "modeling_hunyuan_image_3.py").is_file()
    again = _run(["make-test-model", str(tmp_path / "ckpt")], tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
