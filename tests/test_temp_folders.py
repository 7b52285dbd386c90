"""Temporary folders: the tests and the test checkpoint's code loader remove what they make, and the
loader's link folder belongs to one process of one user (random name, mode 0700), gone at exit."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _run(code: str, tmp: Path) -> str:
    env = dict(os.environ, TMPDIR=str(tmp))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("hy3", "hunyuan")))


def test_a_test_run_leaves_no_temp_folder(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for name in ("HF_HOME", "HF_MODULES_CACHE"):
        env.pop(name, None)  # as a fresh run: conftest makes its own hy3-hf-* folder
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", str(TESTS / "core/test_units.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert _left(tmp_path) == []


def test_load_remote_code_leaves_no_temp_folder(tmp_path: Path) -> None:
    out = _run("from hunyuan_loader.standalone import load_pack; load_pack()\n"
               "from hunyuan_image3.hunyuan_loader.test_model.builder import load_remote_code\n"
               "import tempfile, os; load_remote_code('base'); load_remote_code('instruct')\n"
               "print(sorted(os.listdir(tempfile.gettempdir())))", tmp_path)
    assert "hy3_remote_code_" in out  # made while the process runs
    assert _left(tmp_path) == []  # removed at its exit


_LINK = ("from hunyuan_loader.standalone import load_pack; load_pack()\n"
         "from hunyuan_image3.hunyuan_loader.checkpoint.validate import loadable_path, validate_checkpoint\n"
         "print(loadable_path(validate_checkpoint({path!r})))")


def test_the_link_folder_is_private_to_one_process(base_checkpoint: Path, tmp_path: Path) -> None:
    first = Path(_run(_LINK.format(path=str(base_checkpoint)), tmp_path).strip())
    second = Path(_run(_LINK.format(path=str(base_checkpoint)), tmp_path).strip())
    assert first.parent != second.parent and first.name == second.name  # same module name, other folders
    assert first.parent.parent == tmp_path and first.parent.name != "hunyuan_image3_links"
    assert _left(tmp_path) == []  # removed at exit


def test_the_link_folder_is_readable_by_its_user_only(base_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from hunyuan_image3.hunyuan_loader.checkpoint import validate

    link = validate.loadable_path(validate.validate_checkpoint(base_checkpoint))
    folder = link.parent
    assert folder != Path(tempfile.gettempdir()) / "hunyuan_image3_links"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    assert link.resolve() == base_checkpoint.resolve()
    gone = tmp_path / "hunyuan_image3_links_gone"  # the process's folder, after a temp cleaner took it
    monkeypatch.setattr(validate, "_link_folder", gone)
    again = validate.loadable_path(validate.validate_checkpoint(base_checkpoint))
    assert again.parent not in (gone, folder) and not gone.exists()
    assert stat.S_IMODE(again.parent.stat().st_mode) == 0o700 and again.resolve() == base_checkpoint.resolve()
