"""Checks a checkpoint folder before anything is loaded, so bad input fails fast and
leaves nothing half-loaded. Also gives remote code a safe module name."""

from __future__ import annotations

import ast
import atexit
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CheckpointError, DependencyError
from ..core.torch_pairs import torchvision_hint
from .layout import parse_header

log = logging.getLogger(__name__)

MODEL_TYPE = "hunyuan_image_3_moe"
ARCHITECTURE = "HunyuanImage3ForCausalMM"
WHERE_MODELS_GO = (
    "Put the checkpoint folder in ComfyUI/models/HunyuanImage-3/ (for example "
    "`huggingface-cli download tencent/HunyuanImage-3.0 --local-dir "
    "ComfyUI/models/HunyuanImage-3/HunyuanImage-3`), or list another folder under "
    "'HunyuanImage-3' in extra_model_paths.yaml."
)


@dataclass(frozen=True)
class CheckpointInfo:
    """A validated checkpoint folder."""

    path: Path
    config: dict
    shard_files: tuple[Path, ...]
    weight_bytes: int


def read_config(path: Path) -> dict:
    """Read config.json of a folder, with errors that say what to do."""
    if not path.exists():
        raise CheckpointError(f"Model folder not found: {path}. {WHERE_MODELS_GO}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model folder. {WHERE_MODELS_GO}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder. "
            f"Point the loader at the folder that holds config.json. {WHERE_MODELS_GO}"
        )
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file} is not readable JSON ({exc}). Re-download the checkpoint.") from exc


def is_hunyuan_image3(config: dict) -> bool:
    """True if a config.json describes a HunyuanImage-3 model."""
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def _safetensors_expected_size(file: Path) -> int:
    """Size a .safetensors file must have, from its own header."""
    try:
        header_len, meta = parse_header(file)
    except ValueError:  # too short for its header, or not JSON (an unreadable file still raises OSError)
        return -1
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    return 8 + header_len + end


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is damaged ({exc}). Re-download the checkpoint.") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(
                f"{path} is incomplete: the index lists {len(names)} shards but {len(missing)} are missing "
                f"({shown}). Finish the download (huggingface-cli download resumes) and try again."
            )
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{path} has no safetensors weights (no model.safetensors.index.json or model.safetensors). "
        f"{WHERE_MODELS_GO}"
    )


def validate_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Check folder, config, index and every shard's size; raise CheckpointError on a problem."""
    p = Path(path).expanduser()
    config = read_config(p)
    if not is_hunyuan_image3(config):
        raise CheckpointError(
            f"{p} holds a '{config.get('model_type', 'unknown')}' model "
            f"({', '.join(config.get('architectures') or ['no architectures'])}), not HunyuanImage-3 "
            f"(model_type '{MODEL_TYPE}'). Choose a HunyuanImage-3.0 checkpoint folder."
        )
    if not isinstance(config.get("auto_map"), dict):
        raise CheckpointError(
            f"{p}/config.json has no auto_map, so transformers cannot find the model's code. "
            "Use the original Hugging Face checkpoint folder, which ships its remote code."
        )
    shards = _shard_files(p)
    total = 0
    for shard in shards:
        size = shard.stat().st_size
        if _safetensors_expected_size(shard) != size:
            raise CheckpointError(
                f"Shard {shard.name} in {p} is truncated or damaged ({size} bytes on disk). "
                "Delete it and download it again."
            )
        total += size
    return CheckpointInfo(path=p, config=config, shard_files=tuple(shards), weight_bytes=total)


_SAFE = re.compile(r"[^A-Za-z0-9_]")


_link_folder: Path | None = None


def _link_dir() -> Path:
    """This process's folder for the links: made by mkdtemp (a random name, mode 0700, so no other
    user can list it or plant a link the loader would follow), removed when the process exits; made
    anew if something removed it (a temp cleaner, on a server that runs for weeks)."""
    global _link_folder
    if _link_folder is None or not _link_folder.is_dir():
        _link_folder = Path(tempfile.mkdtemp(prefix="hunyuan_image3_links_"))
        atexit.register(shutil.rmtree, _link_folder, ignore_errors=True)
    return _link_folder


def loadable_path(info: CheckpointInfo) -> Path:
    """A path for from_pretrained whose last part is a valid, unique Python module name.

    transformers turns the folder name into the module name of the remote code. A name with
    dots breaks older versions (the official README forbids dots), and two checkpoints with
    the same folder name but different code would share one cached module. We load through
    a symlink named ``<safe name>_<hash of path and code>`` in this process's private link folder.
    """
    digest = hashlib.sha1(str(info.path.resolve()).encode())
    for code in sorted(info.path.glob("*.py")):
        digest.update(code.name.encode())
        digest.update(code.read_bytes())
    name = f"{_SAFE.sub('_', info.path.name)}_{digest.hexdigest()[:10]}"
    link = _link_dir() / name
    if link.is_symlink() and Path(os.readlink(link)) != info.path.resolve():
        link.unlink()
    if not link.exists():
        try:
            link.symlink_to(info.path.resolve(), target_is_directory=True)
        except OSError as exc:
            if "." in info.path.name:
                raise CheckpointError(
                    f"The folder name '{info.path.name}' contains dots, which the model's code cannot "
                    f"load from, and a dot-free link could not be made ({exc}). Rename the folder "
                    "without dots (e.g. HunyuanImage-3)."
                ) from exc
            return info.path
    log.debug("loading %s through %s", info.path, link)
    return link


# Import name -> pip package, where they differ.
_PIP_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def code_imports(path: Path) -> set[str]:
    """Top-level packages the checkpoint's own *.py files import unconditionally (module level,
    outside try blocks: optional imports such as flash_attn sit in try blocks)."""
    found: set[str] = set()
    for file in sorted(Path(path).glob("*.py")):
        try:
            found |= _source_imports(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
    return found - set(sys.stdlib_module_names)


@functools.lru_cache(maxsize=16)
def _source_imports(source: str) -> frozenset[str]:
    """Top-level packages one source text imports at module level. Keyed by the text: parsing the
    model code takes ~12 ms a load, and a model is loaded again after an unload."""
    found: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return frozenset(found)


def check_code_dependencies(path: Path) -> None:
    """Raise DependencyError naming every package the model's code imports that is not installed.

    Every official code file imports diffusers, the image processor torchvision, the model
    einops: without this check the first load fails with a raw ImportError deep in transformers.
    """
    missing = []
    for name in sorted(code_imports(path)):
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # ValueError: a sys.modules entry of None (import blocked)
            missing.append(name)
    if missing:
        others = [_PIP_NAMES.get(name, name) for name in missing if name != "torchvision"]
        hints = []
        if others:
            hints.append(f"install with `python -m pip install {' '.join(others)}` (or `-r requirements.txt` of "
                         "this pack, which lists them) into the Python that runs ComfyUI")
        if "torchvision" in missing:
            hints.append(torchvision_hint())  # not in requirements.txt: it must match torch's build
        raise DependencyError(
            f"The model's code in {path} imports {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed in this Python. {'; '.join(hints)}. Then start again."
        )
