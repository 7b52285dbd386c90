"""Enumerate and move every tensor a module's weights consist of, bnb state included.

``module.to()`` is not an option: transformers refuses it on 8-bit models, bnb's
``Linear8bitLt`` leaves ``state.CB``/``state.SCB`` behind, and a ``Params4bit``'s
``quant_state`` lives outside the parameter. So we walk the modules ourselves and
collect *references* (who holds the tensor, under which name), grouped by the tensor
they point at: aliases such as ``weight.data`` / ``state.CB`` or a ``quant_state``
shared by two parameters move once and stay aliased.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

# Tensor attributes of bnb's MatmulLtState (Linear8bitLt.state) that may hold data.
# ("idx", the outlier columns of the last input, is transient: normalize_bnb_state drops it.)
_LT_STATE_ATTRS = ("CB", "SCB", "SB", "CBt", "SBt", "subB")
# Tensor attributes of Int8Params (before the first forward the int8 data sits here).
_INT8_PARAM_ATTRS = ("CB", "SCB")
# Tensor attributes of bnb's QuantState (Params4bit.quant_state); state2 is the nested one.
_QUANT_STATE_ATTRS = ("absmax", "code", "offset")


@dataclass(frozen=True, slots=True)
class TensorRef:
    """One place that holds a weight tensor: ``kind`` is param | buffer | attr."""

    owner: object
    name: str
    kind: str

    def get(self) -> torch.Tensor | None:
        if self.kind == "param":
            p = self.owner._parameters.get(self.name)  # type: ignore[attr-defined]
            return None if p is None else p.data
        if self.kind == "buffer":
            return self.owner._buffers.get(self.name)  # type: ignore[attr-defined]
        value = getattr(self.owner, self.name, None)
        return value if isinstance(value, torch.Tensor) else None

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            # Assigning .data keeps the Parameter object (and its bnb subclass attributes).
            self.owner._parameters[self.name].data = tensor  # type: ignore[attr-defined]
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = tensor  # type: ignore[attr-defined]
        else:
            setattr(self.owner, self.name, tensor)


@dataclass
class WeightTensor:
    """One distinct tensor and every reference that points at it."""

    tensor: torch.Tensor
    refs: list[TensorRef] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def assign(self, tensor: torch.Tensor) -> None:
        """Point every reference at ``tensor`` (same dtype and shape)."""
        for ref in self.refs:
            ref.set(tensor)
        self.tensor = tensor


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())  # torch.Size is a tuple


def _module_refs(module: nn.Module) -> Iterator[TensorRef]:
    """References held directly by ``module`` (not its children)."""
    for name, p in module._parameters.items():
        if p is None:
            continue
        yield TensorRef(module, name, "param")
        if type(p).__name__ == "Int8Params":
            for attr in _INT8_PARAM_ATTRS:
                if isinstance(getattr(p, attr, None), torch.Tensor):
                    yield TensorRef(p, attr, "attr")
        qs = p.__dict__.get("quant_state")
        if qs is not None:
            yield from _quant_state_refs(qs)
    for name, b in module._buffers.items():
        if b is not None:
            yield TensorRef(module, name, "buffer")
    state = module.__dict__.get("state")
    if state is not None and type(state).__name__ == "MatmulLtState":
        for attr in _LT_STATE_ATTRS:
            if isinstance(getattr(state, attr, None), torch.Tensor):
                yield TensorRef(state, attr, "attr")
    qs = module.__dict__.get("quant_state")
    if qs is not None and type(qs).__name__ == "QuantState":
        yield from _quant_state_refs(qs)
    # Plain tensor attributes (caches some model code keeps outside buffers).
    for name, value in module.__dict__.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            yield TensorRef(module, name, "attr")


def _quant_state_refs(qs: object) -> list[TensorRef]:
    """A QuantState's tensors, then its nested state2's (a loop: this runs for every 4-bit Linear)."""
    out = []
    while qs is not None:
        for attr in _QUANT_STATE_ATTRS:
            if isinstance(getattr(qs, attr, None), torch.Tensor):
                out.append(TensorRef(qs, attr, "attr"))
        qs = getattr(qs, "state2", None)
    return out


def _unpack_cpu_4bit(modules: Iterable[nn.Module]) -> None:
    """Undo bnb's AVX512-BF16 CPU repacking of 4-bit weights (done at a CPU forward)."""
    for m in modules:
        w = m._parameters.get("weight")
        qs = getattr(w, "quant_state", None) if w is not None else None
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            if getattr(m, "quant_state", None) is not None:
                m.quant_state = w.quant_state


def normalize_bnb_state(modules: Iterable[nn.Module]) -> None:
    """Bring bnb layers into their steady state so that every weight has one home.

    Linear8bitLt moves ``weight.CB/SCB`` into ``state`` at its first forward
    (``init_8bit_state``); we do it up front so a move or a stream never leaves a stale
    alias behind. ``state.idx`` (outlier columns of the last input) is recomputed each
    forward and dropped. 4-bit weights repacked for a CPU forward are unpacked.
    """
    mods = list(modules)
    for m in mods:
        state = m.__dict__.get("state")
        if state is None or type(state).__name__ != "MatmulLtState":
            continue
        w = m._parameters.get("weight")
        if w is not None and getattr(w, "CB", None) is not None and hasattr(m, "init_8bit_state"):
            m.init_8bit_state()
        state.idx = None
    _unpack_cpu_4bit(mods)


def weight_tensors(modules: nn.Module | Iterable[nn.Module], *, recurse: bool = True) -> list[WeightTensor]:
    """Every distinct tensor the weights of ``modules`` consist of, with all its references.

    ``modules`` is one module (its whole subtree with ``recurse``) or an iterable of
    modules whose *direct* tensors are taken. Includes parameters, buffers, Int8Params
    ``.CB/.SCB``, ``Linear8bitLt.state`` tensors, ``Params4bit.quant_state`` (absmax,
    code, nested offset/state2) and plain tensor attributes of the modules.
    """
    if isinstance(modules, nn.Module):
        mods = list(modules.modules()) if recurse else [modules]
    else:
        mods = list(modules)
    normalize_bnb_state(mods)
    groups: dict[tuple, WeightTensor] = {}
    seen: set[tuple[int, str]] = set()
    for m in mods:
        for ref in _module_refs(m):
            if (id(ref.owner), ref.name) in seen:  # e.g. a quant_state shared by two params
                continue
            seen.add((id(ref.owner), ref.name))
            t = ref.get()
            if t is None:
                continue
            key = _tensor_key(t)
            group = groups.get(key)
            if group is None:
                group = groups[key] = WeightTensor(t)
            group.refs.append(ref)
    return list(groups.values())


def weights_bytes(tensors: Iterable[WeightTensor]) -> int:
    return sum(w.nbytes for w in tensors)


def module_weight_bytes(module: nn.Module | Iterable[nn.Module]) -> int:
    """Bytes of every distinct weight tensor (bnb state included) of ``module``."""
    return weights_bytes(weight_tensors(module))


def weights_devices(tensors: Iterable[WeightTensor]) -> set[torch.device]:
    return {w.tensor.device for w in tensors}


def move_weight_tensors(
    tensors: Iterable[WeightTensor],
    device: torch.device | str,
    *,
    pin: bool = False,
    non_blocking: bool = False,
) -> int:
    """Move each tensor to ``device`` bit-exactly and re-point its references; returns bytes moved."""
    device = torch.device(device)
    pin = pin and device.type == "cpu" and torch.cuda.is_available()
    moved = 0
    for w in tensors:
        t = w.tensor
        same = t.device == device if device.index is not None else t.device.type == device.type
        if same and (not pin or t.is_pinned()):
            continue
        if pin:
            new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=True)
            new.copy_(t, non_blocking=non_blocking)
        else:
            new = t.to(device, non_blocking=non_blocking)
        w.assign(new)
        moved += w.nbytes
    return moved


def move_module_weights(
    module: nn.Module | Iterable[nn.Module],
    device: torch.device | str,
    *,
    pin: bool = False,
    non_blocking: bool = False,
) -> int:
    """Move every weight tensor of ``module`` (params, buffers, bnb state) to ``device``.

    Never calls ``module.to()``. ``pin`` makes CPU copies page-locked (only with CUDA).
    Returns the bytes moved.
    """
    return move_weight_tensors(weight_tensors(module), device, pin=pin, non_blocking=non_blocking)
