"""Running the W8A16 Triton kernels in Triton's CPU interpreter, for the tests without a GPU.

A script runs in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter is chosen when Triton is
imported); ``{root!r}`` / ``{tests!r}`` in it become the repository and tests folders. It must exit 0
and print ``KERNEL OK``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The start of a script that runs pack code: the pack imported from the repository, and a fix for
# Triton 3.6's interpreter, which turns a loop bound into a Python int with int(<1-element array>),
# something NumPy >= 2.4 refuses: that one conversion takes the element (the kernels are unchanged).
PRELUDE = r"""
import sys, torch
from triton.runtime import interpreter as _interp
_patch = _interp._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_interp._patch_lang_tensor = _patch_lang_tensor
sys.path.insert(0, {root!r})
from hunyuan_loader.standalone import load_pack
load_pack()
"""

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed here")


def interpret(script: str) -> str:
    """Run ``script`` under the interpreter; its stdout, after checking it ended with ``KERNEL OK``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = script.replace("{root!r}", repr(str(ROOT))).replace("{tests!r}", repr(str(ROOT / "tests")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "KERNEL OK" in out.stdout, out.stdout[-2000:]
    return out.stdout
