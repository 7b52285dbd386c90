"""The demo's test checkpoint: one cached copy per variant, rebuilt when the builder's code changes.

Lives in ``$XDG_CACHE_HOME/hunyuan_image3`` (default ``~/.cache/hunyuan_image3``) as
``test-model-<variant>-<hash of hunyuan_loader/test_model>``. A build goes to a scratch
folder next to it and is renamed into place, so an interrupted or concurrent build never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ..core import settings

log = logging.getLogger(__name__)

TEST_MODEL_CODE = Path(__file__).resolve().parents[1] / "test_model"  # hunyuan_loader/test_model
NOISE_NOTE = (
    "the test checkpoint has random weights, so its image is noise by design (it runs the real code "
    "paths in seconds). For real images download HunyuanImage-3.0 (~160-170 GB BF16) into "
    "ComfyUI/models/HunyuanImage-3/HunyuanImage-3 and pass --model with that folder."
)


def cache_root() -> Path:
    base = settings.get(settings.CACHE_HOME) or Path.home() / ".cache"
    return Path(base).expanduser() / "hunyuan_image3"


def builder_hash() -> str:
    """12 hex digits over the test checkpoint builder's code (file names and contents)."""
    digest = hashlib.sha1()
    for file in sorted(TEST_MODEL_CODE.rglob("*.py")):
        digest.update(file.relative_to(TEST_MODEL_CODE).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def cached_test_model(variant: str = "base") -> Path:
    """The cached test checkpoint of ``variant``, built on first use; stale builds are removed."""
    from ..test_model import make_test_model

    root = cache_root()
    prefix = f"test-model-{variant}-"
    dest = root / f"{prefix}{builder_hash()}"
    if not (dest / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        scratch = root / f"building-{variant}-{os.getpid()}"
        try:
            make_test_model(scratch, variant, overwrite=True)
            try:
                scratch.rename(dest)
            except OSError:  # another process finished the same build first
                if not (dest / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("built the %s test checkpoint in %s", variant, dest)
    for stale in root.glob(f"{prefix}*"):
        if stale != dest and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return dest
