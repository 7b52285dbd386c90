"""The command line at its edges: `--help` answers before torch is imported; it runs from any folder;
the image is written atomically and a failed write is one line after the timings; Ctrl-C is one
`cancelled` line and exit code 130."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from hunyuan_image3.hunyuan_loader.cli import main as cli
from hunyuan_image3.hunyuan_loader.cli.save import SaveError, save_image_atomically

ROOT = Path(__file__).resolve().parents[2]
_NO_TORCH = (
    "import runpy, sys\n"
    "sys.argv = ['hunyuan_loader', *sys.argv[1:]]\n"
    "try:\n"
    "    {run}\n"
    "except SystemExit as exc:\n"
    "    print('exit', exc.code)\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["plan", "--help"], ["plan", "--bogus"]])
@pytest.mark.parametrize("how", ["module", "folder"])
def test_help_and_usage_errors_do_not_import_torch(argv: list[str], how: str, tmp_path: Path) -> None:
    if how == "module":  # python -m hunyuan_loader, from the pack's folder
        run, cwd = "runpy.run_module('hunyuan_loader', run_name='__main__', alter_sys=True)", ROOT
    else:  # python /path/to/pack/hunyuan_loader, from anywhere
        run, cwd = f"runpy.run_path({str(ROOT / 'hunyuan_loader')!r}, run_name='__main__')", tmp_path
    res = subprocess.run([sys.executable, "-c", _NO_TORCH.format(run=run), *argv], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    out = res.stdout.splitlines()
    assert out[-1] == "torch not imported", res.stdout + res.stderr
    assert out[-2] == ("exit 2" if "--bogus" in argv else "exit 0")


def test_top_level_help_lists_every_command() -> None:
    from hunyuan_image3.hunyuan_loader.cli.args import build_parser

    text = build_parser().format_help()
    for command in ("generate", "plan", "quantize", "make-test-model"):
        assert f"\n  {command} " in text, text


def test_runs_from_another_folder(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "hunyuan_loader"), "plan", "--vram-gb", "24", "--ram-gb", "64"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "fastest that fits" in res.stdout, res.stderr


# -- the image file ----------------------------------------------------------------------------------
def test_save_writes_the_file_with_the_usual_permissions(tmp_path: Path) -> None:
    out = save_image_atomically(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png")
    assert Image.open(out).getpixel((0, 0)) == (255, 0, 0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def _full_disk(monkeypatch) -> None:
    """PIL's save writes a part of the image, then the disk is full."""
    def save(self, fp, *args, **kwargs):
        (fp.write if hasattr(fp, "write") else open(fp, "wb").write)(b"\x89PNG" + b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_full_disk_leaves_no_file_and_keeps_the_earlier_image(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "a.png"
    save_image_atomically(Image.new("RGB", (8, 8), "red"), out)
    before = out.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(SaveError, match=f"could not write the image to {out}: No space left on device"):
        save_image_atomically(Image.new("RGB", (8, 8), "blue"), out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_cli_full_disk_is_one_line_after_the_timings(base_checkpoint: Path, tmp_path: Path, monkeypatch, capsys,
                                                     cache, one_thread) -> None:
    out = tmp_path / "fox.png"
    _full_disk(monkeypatch)
    rc = cli.main(["generate", "--model", str(base_checkpoint), "--steps", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.strip() == f"error: could not write the image to {out}: No space left on device"
    assert "load:" in captured.out and "generate:" in captured.out and "image:" not in captured.out
    assert list(tmp_path.iterdir()) == []  # no truncated image, no temporary file


# -- Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_in_process_is_one_line(base_checkpoint: Path, tmp_path: Path, monkeypatch, capsys, cache) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate", interrupted)
    rc = cli.main(["generate", "--model", str(base_checkpoint), "--steps", "1", "--out", str(tmp_path / "a.png")])
    assert rc == 130 and capsys.readouterr().err.strip() == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_generate(base_checkpoint: Path, tmp_path: Path) -> None:
    """A real SIGINT while the diffusion steps run: `cancelled`, exit 130, no traceback, no file."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    out = tmp_path / "a.png"
    proc = subprocess.Popen([sys.executable, "-m", "hunyuan_loader", "generate", "--model", str(base_checkpoint),
                             "--steps", "200", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen, deadline = "", time.monotonic() + 300
        while "step 1/" not in seen and time.monotonic() < deadline:
            char = proc.stdout.read(1)
            if not char:
                break
            seen += char
        assert "step 1/" in seen, seen + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["cancelled"], stderr
    assert not out.exists()


def test_the_demo_cache_key_covers_the_builders_code() -> None:
    """The cached test checkpoint is named after a hash of hunyuan_loader/test_model (so a changed builder
    rebuilds it), not of an empty file list."""
    import hashlib

    from hunyuan_image3.hunyuan_loader.cli import demo

    assert (demo.TEST_MODEL_CODE / "builder.py").is_file()
    assert len(list(demo.TEST_MODEL_CODE.rglob("*.py"))) >= 5
    assert demo.builder_hash() != hashlib.sha1().hexdigest()[:12]
