"""./dev, run against a stand-in .venv whose python logs what it is asked (no install happens):
it runs from any folder without moving there (paths stay the user's), `./dev setup --model` and
`./dev demo --model` install the torchvision release of the installed torch and stop with the
working pair named when that does not import, and CI's `./dev test` installs no torchvision."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Answers what ./dev asks its python; every call is logged as "<cwd>|<args>".
STUB = r"""#!/usr/bin/env bash
echo "$PWD|$*" >>"$LOG"
case "$*" in
    *"import torchvision"*) [ -f "$VENV_DIR/torchvision-installed" ] && [ ! -f "$VENV_DIR/torchvision-broken" ]; exit ;;
    *"sysconfig"*) echo "$VENV_DIR/site" ;;
    *"m.version"*) echo "2.13.0+cpu" ;;
    *torch_pairs.py*) exec python3 "$@" 2.13.0+cpu ;;
    *"pip install"*torchvision*) touch "$VENV_DIR/torchvision-installed" ;;
esac
exit 0
"""


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STUB, encoding="utf-8")
    python.chmod(0o755)
    files = ("requirements.txt", "requirements-dev.txt", "constraints.txt")  # what ./dev's stamp covers
    digest = hashlib.sha1(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()[:12]
    (venv / ".installed").write_text(digest + "\n", encoding="utf-8")
    return venv


def _dev(venv: Path, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]]]:
    env = dict(os.environ, HUNYUAN_VENV=str(venv), LOG=str(venv / "log"), VENV_DIR=str(venv))
    env.pop("HUNYUAN_CONSTRAINTS", None)  # CI's second stack sets it for its own venv, not for this stand-in
    res = subprocess.run([str(ROOT / "dev"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    log = (venv / "log").read_text(encoding="utf-8") if (venv / "log").exists() else ""
    return res, [tuple(line.split("|", 1)) for line in log.splitlines()]


def test_demo_runs_where_the_user_stands(venv: Path, tmp_path: Path) -> None:
    here = tmp_path / "elsewhere"
    here.mkdir()
    res, calls = _dev(venv, here, "demo", "--out", "fox.png")
    assert res.returncode == 0, res.stderr
    cwd, args = calls[-1]
    # `-m`: the pack is on the venv's path (link_pack); run as a folder, its own kernels/ would hide PyPI's
    assert cwd == str(here) and args == "-m hunyuan_loader generate --out fox.png"
    assert not any("torchvision" in a for _, a in calls)  # the test checkpoint needs none


def test_setup_puts_only_hunyuan_loader_on_the_venvs_path(venv: Path, tmp_path: Path) -> None:
    res, _ = _dev(venv, tmp_path, "setup")
    assert res.returncode == 0, res.stderr
    pack = Path((venv / "site" / "hunyuan_image3_pack.pth").read_text(encoding="utf-8").strip())
    assert [p.name for p in pack.iterdir()] == ["hunyuan_loader"]
    assert (pack / "hunyuan_loader").resolve() == ROOT / "hunyuan_loader"


def test_test_runs_the_suite_from_the_pack_and_installs_no_torchvision(venv: Path, tmp_path: Path) -> None:
    res, calls = _dev(venv, tmp_path, "test", "-q")
    assert res.returncode == 0, res.stderr
    assert calls[-1] == (str(ROOT), "-m pytest -q")
    assert not any("torchvision" in a for _, a in calls)


@pytest.mark.parametrize("args", [["setup", "--model"], ["demo", "--model", "/m", "--steps", "1"]])
def test_model_setup_installs_the_matching_torchvision(venv: Path, tmp_path: Path, args: list[str]) -> None:
    res, calls = _dev(venv, tmp_path, *args)
    assert res.returncode == 0, res.stderr
    installs = [a for _, a in calls if "pip install" in a]
    assert installs == ["-m pip install -q --disable-pip-version-check --no-deps torchvision==0.28.*"]
    assert "installing torchvision==0.28.* (the real model's image processor imports it" in res.stderr
    _, again = _dev(venv, tmp_path, *args)  # installed now: nothing more
    assert len([a for _, a in again if "pip install" in a]) == 1


def test_a_torchvision_that_does_not_import_is_removed_and_the_pair_named(venv: Path, tmp_path: Path) -> None:
    (venv / "torchvision-broken").touch()  # PyPI's torchvision beside a torch from another index
    res, calls = _dev(venv, tmp_path, "demo", "--model", "/m")
    assert res.returncode == 1
    assert any("pip uninstall -q -y torchvision" in a for _, a in calls)
    assert "does not import beside torch 2.13.0+cpu" in res.stderr
    assert "pip install torch==2.14.1 torchvision==0.29.1" in res.stderr and "./dev setup --model" in res.stderr
    assert not any("generate" in a for _, a in calls)  # stopped before the minutes of loading


def test_a_relative_venv_is_where_the_user_stands(venv: Path, tmp_path: Path) -> None:
    env = dict(os.environ, HUNYUAN_VENV="venv", LOG=str(venv / "log"), VENV_DIR=str(venv))
    res = subprocess.run([str(ROOT / "dev"), "test", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert (venv / "log").read_text(encoding="utf-8").splitlines()[-1] == f"{ROOT}|-m pytest -q"
