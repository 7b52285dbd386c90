"""bench/step_cache.py runs on the CPU at tiny widths (the GPU run is the lead's): every row, both
choices, the official schedule's count of full evaluations, and no block copy for a served step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hunyuan_image3.hunyuan_loader.hooks.step_cache import StepCache, StepCacheSettings

ROOT = Path(__file__).resolve().parents[1]


def _full_evaluations(steps: int) -> int:
    hook = StepCache(None, StepCacheSettings("taylor"), steps)  # the entry's own rule, walked step by step
    full = 0
    for step in range(steps):
        if hook.is_full(step):
            hook._since_full, full = 0, full + 1
        else:
            hook._since_full += 1
    return full


def test_step_cache_bench_runs_on_the_cpu() -> None:
    steps = 8
    res = subprocess.run([sys.executable, "bench/step_cache.py", "--cpu", "--layers", "4", "--stream-frac", "0.75",
                          "--steps", str(steps), "--tokens", "64"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = re.findall(r"^(.+?)\s+(off|taylor)\s+(\d+) full evaluations\s+([\d.]+) s/image\s+([\d.]+)x\s+rel\. L2 "
                      r"([\d.]+)(?:\s+(\d+) block copies)?$", res.stdout, re.M)
    labels = [r[0].strip() for r in rows]
    assert labels == [lab for lab in ("resident bf16", "streamed bf16 (3 of 4 streamed)", "resident W8A16")
                      for _ in range(2)], res.stdout
    full = _full_evaluations(steps)
    for label, kind, evals, _secs, _speed, l2, copies in rows:
        assert int(evals) == (steps if kind == "off" else full) and full < steps
        assert (float(l2) == 0.0) == (kind == "off")
        if "streamed" in label:  # 3 streamed blocks through 2 slots: 3 copies a pass (+ the first prefetch)
            assert int(copies) == 3 * int(evals) + 1
    assert "summary" in res.stdout
