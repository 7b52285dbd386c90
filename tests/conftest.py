"""Test setup: offline Hugging Face caches in a temp folder, the pack imported as
``hunyuan_image3``, and shared fixtures (the test checkpoint is built once a session)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_HF_TMP = tempfile.mkdtemp(prefix="hy3-hf-")
# Read once at `import transformers`: set before anything imports it.
os.environ.setdefault("HF_HOME", _HF_TMP)
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(_HF_TMP, "modules"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The pack's own cache (preview projections, ...) in the same temp folder: never the user's, and one per
# test process (pytest-xdist workers write no file another one reads).
os.environ["XDG_CACHE_HOME"] = os.path.join(_HF_TMP, "xdg")
# pytest-xdist (CI: -n <cores>): the cores are shared by its workers, so each worker's torch, and the
# subprocesses the tests start (they inherit this), use their share; read by torch at its import.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent  # the shared fixtures (fixtures_model, ...) for tests in sub-folders
for _path in (ROOT, TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from hunyuan_loader.standalone import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_THREADS)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(_HF_TMP, ignore_errors=True)  # the temp folder this file made (subprocesses are done)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long CPU test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _build(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    from fixtures_model import build

    return build(tmp_path_factory, variant)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test checkpoint, base variant (one PIL image from generate_image)."""
    return _build(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def instruct_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test checkpoint, Instruct variant ((cot, [images]); ignores the steps kwargs)."""
    return _build(tmp_path_factory, "instruct")


@pytest.fixture(scope="session")
def distil_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test checkpoint, Instruct-Distil variant (8 steps, guidance 2.5)."""
    return _build(tmp_path_factory, "distil")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on two (possibly contended) cores run far faster with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache():
    """The process-wide model cache, emptied after the test."""
    from hunyuan_image3.hunyuan_loader.cache import get_cache

    c = get_cache()
    yield c
    c.force_unload()


class _SettingsMonkeyPatch(pytest.MonkeyPatch):
    """pytest's MonkeyPatch whose setenv / delenv also refresh the pack's settings: they are parsed once
    and cached (core/settings.py), and a test that changes a variable mid-test must see the change."""

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        super().setenv(name, value, prepend)
        _refresh_settings()

    def delenv(self, name: str, raising: bool = True) -> None:
        super().delenv(name, raising)
        _refresh_settings()


def _refresh_settings() -> None:
    from hunyuan_image3.hunyuan_loader.core import settings

    settings.refresh()


@pytest.fixture
def monkeypatch():
    """The ``monkeypatch`` fixture, settings-aware (see _SettingsMonkeyPatch); undone after the test."""
    mp = _SettingsMonkeyPatch()
    yield mp
    mp.undo()
    _refresh_settings()


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Every test starts from the environment as it is (a value cached by an earlier test is forgotten)."""
    _refresh_settings()
    yield
    _refresh_settings()
