"""The weight formats the loaders know, by name: one ``WeightFormat`` per format module.

A format module (bf16.py, bnb_int8.py, bnb_nf4.py, w8a16.py) subclasses ``WeightFormat`` and
registers one instance with ``register(...)``; ``formats/__init__.py`` imports the built-in ones, so
every lookup here sees them. Everything else asks the registry instead of naming formats:
- the loader's choice (``quant``, ``int8_format``) -> ``for_load``; a pre-quantized checkpoint's
  ``quantization_config`` -> ``for_config``; a built model -> ``for_model``; a module -> ``owner_of``;
- sizes: ``WeightFormat.parts`` is the one size model of a quantized weight (the tensors it is
  stored as); ``placed_bytes`` gives a tensor's bytes exact (the ``plan`` command) or 256-byte
  aligned as the residency engine packs them (the load plan).
An unknown name, configuration or quantized module is an error here, never a guess.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from ..core.errors import CheckpointError, InputError
from ..core.quants import allow_quant, forget_quant
from ..core.units import aligned  # the residency engine packs every tensor 256-byte aligned
from .quantization import is_quantizable


class WeightFormat:
    """One weight format: what the loaders, the planner and the checks need to know about it.

    Subclasses set the class attributes and override what differs; the defaults are those of a
    format that stores every weight as it is (bf16)."""

    name: str = ""  # the registry key
    quant: str = ""  # the loader's ``quant`` that selects it (LoadSpec.quant)
    option: str | None = None  # the loader's ``int8_format`` that picks it among formats of one quant
    quantized: bool = True  # it stores the skip rules' Linears its own way (and a copy carries its config)
    replicable: bool = True  # its modules can be copied to another GPU (CFG-parallel replicas)
    disk_ratio: float = 1.0  # GPU bytes per BF16 byte on disk, for the room asked before a load
    #                          (load_gpu_bytes); tests/formats check it against ``parts`` on the real model

    # -- the size model -----------------------------------------------------------------------------
    def parts(self, numel: int, rows: int) -> tuple[int, ...]:
        """Bytes of each tensor one quantized 2-D weight of ``numel`` values and ``rows`` output rows
        becomes (weight, scales, quantization state)."""
        return (2 * numel,)

    def placed_bytes(self, shape: Sequence[int], itemsize: int, quantized: bool, *, align: bool = True) -> int:
        """Bytes a weight of ``shape`` takes once loaded: quantized (``parts``) when the skip rules
        quantize it, else ``itemsize`` bytes a value; each tensor 256-byte aligned with ``align``
        (as the residency engine packs it), exact without."""
        numel = math.prod(shape)
        sizes = self.parts(numel, shape[0] if shape else 1) if quantized and self.quantized else (numel * itemsize,)
        return sum(aligned(n) for n in sizes) if align else sum(sizes)

    def stored_bytes(self, name: str, nbytes: int) -> int:
        """Placed bytes of a tensor of a pre-quantized copy (stored as it will live)."""
        return aligned(nbytes)

    # -- loading ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Make the format usable before a load (dependencies, registration with transformers);
        a DependencyError naming the fix when it cannot be."""

    def quantization_config(self, skip_modules: list[str]) -> Any:
        """The ``quantization_config`` for a fresh load (transformers replaces the modules the skip
        rules leave and quantizes them as they load); None for a format that quantizes nothing."""
        return None

    def owns(self, module: Any) -> bool:
        """Whether ``module`` is one of this format's quantized modules."""
        return False

    # -- pre-quantized copies --------------------------------------------------------------------------
    def recognises(self, quantization_config: dict) -> bool:
        """Whether a checkpoint's ``quantization_config`` (config.json) is this format; may raise a
        CheckpointError for a variant of its family that the pack does not load."""
        return False

    def stored_modules(self, tensor_names: Iterable[str]) -> set[str]:
        """Modules whose quantized weights a pre-quantized checkpoint with these tensors holds."""
        return set()


# -- helpers for format modules ---------------------------------------------------------------------
def instance_of(module: Any, package: str, class_name: str) -> bool:
    """``module`` is a ``package.class_name`` (False while ``package`` is not imported: then no module
    can be one; so "is this module mine" never imports a format's library)."""
    cls = getattr(sys.modules.get(package), class_name, None)
    return cls is not None and isinstance(module, cls)


def modules_with(tensor_names: Iterable[str], suffixes: Iterable[str]) -> set[str]:
    """The module of every tensor whose name ends with one of ``suffixes``."""
    ends = tuple(suffixes)
    out = set()
    for name in tensor_names:
        for suffix in ends:
            if name.endswith(suffix):
                out.add(name[: -len(suffix)])
                break
    return out


_FORMATS: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    """Add ``fmt`` (its name must be new); its ``quant`` becomes a loader choice LoadSpec accepts."""
    if not fmt.name or not fmt.quant:
        raise ValueError(f"a weight format needs a name and a quant: {fmt!r}")
    if fmt.name in _FORMATS:
        raise ValueError(f"weight format '{fmt.name}' is registered already")
    _FORMATS[fmt.name] = fmt
    allow_quant(fmt.quant)
    return fmt


def unregister(name: str) -> None:
    """Remove a format (tests that register their own)."""
    fmt = _FORMATS.pop(name)
    if not any(f.quant == fmt.quant for f in _FORMATS.values()):
        forget_quant(fmt.quant)


def formats() -> list[WeightFormat]:
    """Every registered format, in registration order."""
    return list(_FORMATS.values())


def get(name: str) -> WeightFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise InputError(f"weight format '{name}' is not one of {', '.join(_FORMATS)}.") from None


def loader_quants() -> tuple[str, ...]:
    """The loaders' ``quant`` choices, in registration order."""
    return tuple(dict.fromkeys(f.quant for f in _FORMATS.values()))


def for_load(quant: str, int8_format: str | None = None) -> WeightFormat:
    """The format a loader's (``quant``, ``int8_format``) loads a full-precision checkpoint in."""
    found = [f for f in _FORMATS.values() if f.quant == quant]
    if len(found) > 1:
        found = [f for f in found if f.option == int8_format]
    if len(found) != 1:
        what = f"quantization '{quant}'" + (f" with int8_format '{int8_format}'" if int8_format else "")
        raise InputError(f"{what} is not a known weight format (known: {', '.join(_FORMATS)}).")
    return found[0]


def config_dict(quantization_config: Any) -> dict | None:
    """A ``quantization_config`` (config.json's dict, or transformers' config object) as a dict."""
    if quantization_config is None or isinstance(quantization_config, dict):
        return quantization_config
    return quantization_config.to_dict()


def for_config(quantization_config: Any) -> WeightFormat | None:
    """The format of a pre-quantized checkpoint's ``quantization_config`` (None: not pre-quantized);
    a CheckpointError for a configuration no registered format recognises."""
    qc = config_dict(quantization_config)
    if not qc:
        return None
    for fmt in _FORMATS.values():
        if fmt.recognises(qc):
            return fmt
    method = qc.get("quant_method", "bitsandbytes")
    raise CheckpointError(
        f"This checkpoint is quantized with '{method}', which this pack does not load. Use the BF16 "
        "checkpoint (with the INT8 or NF4 loader), or a copy written by `python -m hunyuan_loader quantize`."
    )


def for_model(model: Any) -> WeightFormat | None:
    """The format a built model's ``config.quantization_config`` names (None: none)."""
    return for_config(getattr(model.config, "quantization_config", None))


def owner_of(module: Any) -> WeightFormat | None:
    """The format whose quantized module ``module`` is (None: an ordinary module)."""
    for fmt in _FORMATS.values():
        if fmt.owns(module):
            return fmt
    return None


# -- lookups over a built model ---------------------------------------------------------------------
def quantization_config(quant: str, skip_modules: list[str]) -> Any:
    """The quantization_config of a fresh load with the ``quant`` loader (bitsandbytes for int8;
    None for bf16): the registered format's (formats/registry.py)."""
    return for_load(quant, "bnb").quantization_config(skip_modules)


def quantized_module_names(model: Any) -> list[str]:
    """Names of the modules that hold quantized weights, of any registered format
    (formats/registry.py); a CheckpointError for a module with integer weights that no format owns."""
    names = []
    for name, module in model.named_modules():
        if owner_of(module) is not None:
            names.append(name)
            continue
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None and not (weight.dtype.is_floating_point or weight.dtype.is_complex):
            raise CheckpointError(
                f"{name} is a {type(module).__name__} with {weight.dtype} weights, a quantized module of no "
                "weight format this pack knows. Load the BF16 checkpoint, or a copy written by this pack."
            )
    return sorted(names)


def check_quantized_modules(model: Any) -> None:
    """Refuse a model in which a module that must stay in full precision is quantized."""
    bad = [name for name in quantized_module_names(model) if not is_quantizable(name)]
    if bad:
        raise CheckpointError(
            f"{len(bad)} module(s) that must stay in full precision are quantized, first: {bad[0]} "
            "(quantizing the router, shared expert, embedders, VAE or vision parts garbles images or "
            "crashes). Use the original BF16 checkpoint, or a quantized copy written by this pack "
            "(`python -m hunyuan_loader quantize`)."
        )
