"""The path rule for node inputs that name a file or folder (no ComfyUI import).

Inside ComfyUI such an input is a NAME, never a path: the name of an entry directly inside
one of the registered roots (models/HunyuanImage-3 and the extra_model_paths.yaml entries
for that key). A name is refused when it is empty, absolute, contains '..' or a path
separator, or is hidden (starts with a dot); an entry whose resolved path (after symlinks
and junctions) is not inside its resolved root is refused too. Listing uses the same rule,
so the names offered are exactly the names that resolve. This matters because a model
folder's *.py files are imported into the ComfyUI process (trust_remote_code): see
docs/security.md.

Every node input that names a file or a folder, now or later (for example an output folder
for a quantized copy), goes through :func:`resolve_name`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..hunyuan_loader.core.errors import CheckpointError, InputError

Reject = Callable[[Path], str | None]  # why an existing entry does not qualify, or None


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the name of an entry directly inside a root, or None if it can."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if any(ord(c) < 32 for c in name):
        return "contains control characters"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "goes up a folder ('..')"
    if "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        return "contains a path separator"
    if name.startswith("."):
        return "is hidden (starts with a dot)"
    return None


def _resolved_roots(roots: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        try:
            real = Path(root).expanduser().resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.is_dir() and real not in out:
            out.append(real)
    return out


def resolve_name(
    name: str,
    roots: Iterable[Path],
    reject: Reject | None = None,
    *,
    what: str = "model folder",
    hint: str = "",
    must_exist: bool = True,
) -> Path:
    """The resolved path of entry ``name`` directly inside the first root that has an acceptable one.

    ``reject(path)`` says why an existing entry does not qualify (e.g. "has no config.json"),
    or None when it does. With ``must_exist=False`` (an output to be created) a name that no root has
    yet gives ``<first root>/name``. Raises InputError for a refused name or an entry that
    resolves outside its root, CheckpointError when nothing qualifies; ``hint`` (where such
    entries go) ends every message.
    """
    tail = f" {hint}" if hint else ""
    problem = name_problem(name)
    if problem:
        raise InputError(
            f"{what} '{name}' {problem}: give the name of a folder directly inside a registered "
            f"model folder, not a path.{tail}"
        )
    real_roots = _resolved_roots(roots)
    refusals: list[str] = []
    for root in real_roots:
        entry = root / name
        if not os.path.lexists(entry):
            continue
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            refusals.append(f"{entry} is a broken link")
            continue
        if real == root or not real.is_relative_to(root):
            refusals.append(
                f"{entry} resolves to {real}, outside {root} (links out of a model folder are refused; "
                "list that folder in extra_model_paths.yaml instead)"
            )
            continue
        why = reject(real) if reject is not None else None
        if why:
            refusals.append(f"{entry} {why}")
            continue
        return real
    if refusals:
        raise InputError(f"{what} '{name}' is refused: {'; '.join(refusals)}.{tail}")
    if not must_exist and real_roots:
        return real_roots[0] / name
    searched = ", ".join(str(r) for r in real_roots) or "no model folder is registered or exists"
    raise CheckpointError(f"{what} '{name}' not found (searched: {searched}).{tail}")


def names_in_roots(roots: Iterable[Path], reject: Reject | None = None) -> list[str]:
    """Sorted names of the entries of ``roots`` that :func:`resolve_name` accepts."""
    roots = list(roots)
    names: set[str] = set()
    for root in _resolved_roots(roots):
        try:
            children = [child.name for child in root.iterdir()]
        except OSError:
            continue
        for child in children:
            if child in names or name_problem(child):
                continue
            try:
                resolve_name(child, roots, reject)
            except (InputError, CheckpointError):
                continue
            names.add(child)
    return sorted(names)
