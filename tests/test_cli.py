"""The CLI (the demo of the Quick start) generates an image and prints its report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "hf" / "modules"))
    return subprocess.run([sys.executable, "-m", "hunyuan_loader", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_demo_generates_and_reports(tmp_path: Path) -> None:
    out_png = tmp_path / "demo.png"
    res = _run(["generate", "--steps", "2", "--resolution", "1280x768", "--quant", "int8", "--out", str(out_png)],
               tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("load:", "generate:", "peak RAM:", "test checkpoint:"):
        assert label in res.stdout, res.stdout
    assert Image.open(out_png).size == (1280, 768)


def test_bad_input_exits_2_with_the_message(tmp_path: Path) -> None:
    res = _run(["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")], tmp_path)
    assert res.returncode == 2
    assert "Model folder not found" in res.stderr and "models/HunyuanImage-3" in res.stderr


def test_make_test_model(tmp_path: Path) -> None:
    res = _run(["make-test-model", str(tmp_path / "ckpt"), "--variant", "instruct"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "modeling_hunyuan_image_3.py").is_file()
