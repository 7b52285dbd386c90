"""Library messages that do not concern the user are filtered narrowly, and verbose shows them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hunyuan_image3.hunyuan_loader.core import quiet

ROOT = Path(__file__).resolve().parents[2]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collected(monkeypatch):
    quiet.install()
    monkeypatch.setattr(quiet, "_verbose", False)
    handler = _Collect()
    loggers = [logging.getLogger(str(n.source)) for n in quiet.LOG_NOISE]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_each_known_message_is_dropped_and_nothing_else(collected, monkeypatch) -> None:
    for noise in quiet.LOG_NOISE:
        logger = logging.getLogger(str(noise.source))
        logger.warning(noise.starts_with + ": details %s", 1)
        logger.warning("something else that matters")
        logging.getLogger("some.other.library").warning(noise.starts_with)  # other loggers untouched
    assert collected.messages == ["something else that matters"] * len(quiet.LOG_NOISE)
    monkeypatch.setattr(quiet, "_verbose", True)
    collected.messages.clear()
    for noise in quiet.LOG_NOISE:
        logging.getLogger(str(noise.source)).warning(noise.starts_with + ": shown")
    assert len(collected.messages) == len(quiet.LOG_NOISE)


@pytest.mark.parametrize("verbose", [False, True])
def test_warning_noise_is_ignored_by_message_only(verbose: bool, monkeypatch) -> None:
    monkeypatch.setattr(quiet, "_verbose", verbose)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # everything shows, except what install() puts in front
        quiet.install()
        for noise in quiet.WARNING_NOISE:
            warnings.warn(noise.starts_with + " torch.bfloat16 to float16 during quantization", noise.source,
                          stacklevel=1)
        warnings.warn("a different UserWarning", UserWarning, stacklevel=1)
    shown = [str(w.message) for w in seen]
    assert shown[-1] == "a different UserWarning"
    assert len(shown) == (1 + len(quiet.WARNING_NOISE) if verbose else 1)


def _import_bitsandbytes(verbose: bool) -> str:
    code = "from hunyuan_loader.standalone import load_pack; load_pack(); " \
           "from hunyuan_image3.hunyuan_loader.core import quiet; quiet.install(); import bitsandbytes"
    env = dict(os.environ, HUNYUAN_VERBOSE="1" if verbose else "0", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def test_bitsandbytes_cpu_kernel_note_is_hidden_unless_verbose() -> None:
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward ... pip install kernels" at import on
    CPUs with AVX512-BF16 when the optional `kernels` package is absent."""
    shown = _import_bitsandbytes(verbose=True)
    if "gemm_4bit_forward" not in shown:
        pytest.skip("bitsandbytes does not log the CPU kernel note on this machine")
    assert "gemm_4bit_forward" not in _import_bitsandbytes(verbose=False)
