"""pytest wrapper around the opt-in ComfyUI end-to-end runner (run_comfyui_e2e.py).

Skipped unless COMFYUI_DIR and COMFYUI_PYTHON are set. A skip here is NOT coverage: the
runner is run by hand against a real ComfyUI (see docs/api.md, "End-to-end runner").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "run_comfyui_e2e.py"


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("COMFYUI_DIR") and os.environ.get("COMFYUI_PYTHON")),
    reason="ComfyUI end-to-end run is opt-in: set COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON "
    "(its venv's python, with this pack's requirements installed)",
)
def test_comfyui_end_to_end() -> None:
    res = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True, timeout=3600)
    print(res.stdout[-20000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
