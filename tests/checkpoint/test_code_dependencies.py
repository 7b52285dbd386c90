"""The error for a package the model's own code imports names what really installs it: for
torchvision (never in requirements.txt: it must match torch's build) the dev script's model setup
or the torchvision release of the installed torch, not requirements.txt."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.checkpoint import validate
from hunyuan_image3.hunyuan_loader.core.errors import DependencyError
from hunyuan_image3.hunyuan_loader.core.torch_pairs import installed_torch, torchvision_for

ROOT = Path(__file__).resolve().parents[2]


def _missing(monkeypatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def _code(tmp_path: Path, *modules: str) -> Path:
    (tmp_path / "image_processor.py").write_text("".join(f"import {m}\n" for m in modules), encoding="utf-8")
    return tmp_path


def test_missing_torchvision_names_what_installs_it(tmp_path: Path, monkeypatch) -> None:
    _missing(monkeypatch, "torchvision")
    with pytest.raises(DependencyError) as err:
        validate.check_code_dependencies(_code(tmp_path, "torchvision", "json"))
    text = str(err.value)
    assert "imports torchvision, which is not installed" in text
    assert "./dev setup --model" in text and torchvision_for(installed_torch()) in text
    assert "requirements.txt" not in text.split("torchvision must match torch")[0]  # no false promise


def test_missing_diffusers_and_torchvision_each_get_their_hint(tmp_path: Path, monkeypatch) -> None:
    _missing(monkeypatch, "torchvision", "diffusers")
    with pytest.raises(DependencyError) as err:
        validate.check_code_dependencies(_code(tmp_path, "diffusers", "torchvision"))
    text = str(err.value)
    assert "`python -m pip install diffusers`" in text and "./dev setup --model" in text
    assert "pip install diffusers torchvision" not in text


@pytest.mark.parametrize(("torch", "vision"), [("2.13.0+cpu", "torchvision==0.28.*"), ("2.9.1", "torchvision==0.24.*"),
                                               ("2.14.1+cu130", "torchvision==0.29.*"), (None, "torchvision"),
                                               ("1.13.1", "torchvision")])
def test_torchvision_release_for_each_torch(torch: str | None, vision: str) -> None:
    assert torchvision_for(torch) == vision


def test_the_dev_script_can_run_it_without_the_pack() -> None:
    res = subprocess.run([sys.executable, "-S", str(ROOT / "hunyuan_loader/core/torch_pairs.py"), "2.11.0"],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "torchvision==0.26.*", res.stderr
