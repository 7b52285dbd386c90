"""bench/previews.py runs on any machine at tiny sizes (--smoke): both rows (resident, streamed), previews
made, final latents identical with previews on and off, the fit timed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_previews_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "bench/previews.py", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = re.findall(r"^\| (resident|streamed \(1 of 2\)) \|.*\| (\d+) \|[^|]*\|[^|]*\|[^|]*\| (True|False) \|$",
                      res.stdout, re.M)
    assert [(name, made, same) for name, made, same in rows] == [
        ("resident", "3", "True"), ("streamed (1 of 2)", "3", "True")], res.stdout
    assert re.search(r"fit on a VAE .* first use [\d.]+ s .* a later load [\d.]+ s", res.stdout), res.stdout
