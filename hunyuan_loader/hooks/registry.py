"""One registry per model of everything the pack attaches to it: named entries in ONE global order.

Each behaviour the pack adds to the official model (a forward pre-hook, an instance ``forward``
swap, a wrap of the scheduler for one call) is a ``Hook``: an object with ``attach()`` and
``detach()``, given a name from ``HOOK_ORDER``. ``registry(model)`` holds the entries of that
model; ``install`` / ``remove`` / ``names`` / ``remove_all`` are the only ways the pack adds or
takes them away, so ``names()`` is always the whole list and ``remove_all()`` gives the
official model back.

Why one order: torch runs a module's forward pre-hooks and hooks in registration order, so two
mechanisms on one module (the split's activation moves and the streamer's weight copies on
every decoder block) ran in whatever order the loaders happened to install them. Here the
order is ``HOOK_ORDER`` whatever the call order: installing an entry detaches the installed
entries that come after it and attaches them again after it (they register their torch hooks
anew, so torch's registration order is the documented order). docs/hooks.md has the why of
each position and the recipe to add a hook.
"""

from __future__ import annotations

import contextlib
import logging
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

# The documented execution order, first runs first (a pre-hook before a later pre-hook on the
# same module; a wrapper outside a later wrapper). Every name the pack installs is listed here.
HOOK_ORDER: tuple[str, ...] = (
    "static_cache_init",       # remote_code_fixes: the official KV cache's layers initialised as 5.x asks
    "cache_end_once",          # needless_work: the text stage's KV cache end read once per forward, not per layer
    "cache_kwarg_name",        # remote_code_fixes: the KV cache handed back as past_key_values (5.x: "cache")
    "vit_return_tensors",      # remote_code_fixes: the Instruct ViT processor returns tensors (5.x: lists)
    "rope_cache",              # needless_work: the 2D RoPE table built once per generation, not per forward
    "mask_alignment",          # remote_code_fixes: the decoder's CPU-built text mask to its device
    "vision_input_alignment",  # remote_code_fixes: the vision tower's tensor kwargs to its device
    "cpu_input_casts",         # remote_code_fixes: image modules' float inputs cast as CUDA autocast would
    "split_boundaries",        # split_exec: a block's inputs to the block's device (several devices)
    "block_streaming",         # memory BlockStreamer: a streamed block's weights into a GPU slot
    "moe_dispatch",            # moe_dispatch: MoE blocks' forward -> gather_scatter
    "cfg_rows",                # cfg_parallel: decoder.forward -> the row-splitting wrapper
    "step_cache",              # step_cache, one call: decoder.forward -> a served step runs no block, no replica
    "diffusion_progress",      # generation, one call: scheduler.step -> progress + cancel
    "diffusion_preview",       # standard, one call: scheduler.step -> x0 preview (inside the progress wrap)
    "finite_output",           # finite_output, one call: model.vae.decode -> NaN/inf check of latents, image
    "text_progress",           # generation, one call: the per-token StoppingCriteria
    "last_logits",             # needless_work, one call: lm_head gets the last position only (all generate reads)
)


class Hook(Protocol):
    """One named behaviour. ``attach`` puts all of it on the model (keeping every handle it
    gets), ``detach`` takes all of it off; both may be called again after each other. A class
    attribute ``torch_hooks = False`` marks an entry that registers no torch hook (an instance
    ``forward`` swap: torch runs a module's hooks around whatever its forward is), which the
    registry then never detaches to keep the order."""

    def attach(self) -> None: ...

    def detach(self) -> None: ...


class ModuleHooks:
    """A Hook made of torch forward (pre-)hooks: subclasses list them in ``hooks()``; every
    handle is kept and removed by ``detach``."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def hooks(self) -> list[tuple[nn.Module, str, Any]]:
        """(module, "pre" | "pre_kwargs" | "post" | "post_always", function), in the order to register."""
        raise NotImplementedError

    def attach(self) -> None:
        self.detach()
        for module, kind, fn in self.hooks():
            if kind.startswith("pre"):
                handle = module.register_forward_pre_hook(fn, with_kwargs=kind == "pre_kwargs")
            else:
                handle = module.register_forward_hook(fn, always_call=kind == "post_always")
            self.handles.append(handle)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


_ABSENT = object()  # MethodWrap: the instance had no attribute of that name


class MethodWrap:
    """A Hook made of one method wrapped on one instance: subclasses give ``wrap(original)``, the
    function that stands as ``target.<name>`` in the instance's ``__dict__`` while attached (the class
    and its other instances are untouched). ``detach`` puts back exactly what the instance had: its own
    earlier attribute, or none (the class's method shows through again). Attaching an attached entry
    is refused. Wraps of one method nest, the later outside; one detached while a later one is still
    around it passes calls straight through from then on and is skipped when that one restores (the
    registry's ``remove_all`` detaches in reverse ``HOOK_ORDER``, not in reverse attach order)."""

    torch_hooks = False

    def __init__(self, target: Any, name: str) -> None:
        self.target, self.name = target, name
        self._wrapper: Callable[..., Any] | None = None

    @property
    def attached(self) -> bool:
        return self._wrapper is not None

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """The function to call instead of ``original`` (the method as the instance had it)."""
        raise NotImplementedError

    def attach(self) -> None:
        if self._wrapper is not None:
            raise RuntimeError(f"{type(self).__name__}: {type(self.target).__name__}.{self.name} is already "
                               "wrapped by this entry; detach it before attaching it again")
        before = vars(self.target).get(self.name, _ABSENT)
        original = getattr(self.target, self.name)
        inner = self.wrap(original)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._wrapper is not wrapper:  # detached under a later wrap: the method as it was
                return original(*args, **kwargs)
            return inner(*args, **kwargs)

        wrapper._method_wrap = (self, before)  # type: ignore[attr-defined]  # for a later wrap's restore
        setattr(self.target, self.name, wrapper)
        self._wrapper = wrapper

    def detach(self) -> None:
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is None or vars(self.target).get(self.name, _ABSENT) is not wrapper:
            return  # not attached, or a later wrap stands around this one: its detach skips this one
        restore = wrapper._method_wrap[1]  # type: ignore[attr-defined]
        while isinstance(restore, types.FunctionType) and hasattr(restore, "_method_wrap"):
            owner, before = restore._method_wrap
            if owner._wrapper is restore:
                break
            restore = before  # an earlier wrap, already detached: what it had found instead
        if restore is _ABSENT:
            delattr(self.target, self.name)
        else:
            setattr(self.target, self.name, restore)


class _ClassPatches:
    """The patches of one method of one class: the shipped function and, per entry name, the
    function that wraps it and how many models use that entry."""

    def __init__(self, shipped: Any) -> None:
        self.shipped = shipped
        self.entries: dict[str, list[Any]] = {}  # entry name -> [make, models attached]


_CLASS_PATCHES: dict[tuple[type, str], _ClassPatches] = {}


class ClassMethodPatch:
    """A Hook that wraps one method of a class of the checkpoint's own code (no torch hook).

    The class is shared by every model loaded from that code (a reload, two checkpoints of one code),
    so the patch is counted per entry: the first model that attaches an entry puts it on, the last
    that detaches takes it off. Several entries on one method compose in ``HOOK_ORDER`` (an earlier
    entry's wrapper outside a later one's) whatever order they come and go in; with none left the
    class has its shipped function again. ``make(inner)`` returns the wrapper of ``inner``."""

    torch_hooks = False

    def __init__(self, entry: str, cls: type, name: str, make: Callable[[Any], Any]) -> None:
        _position(entry)
        self.entry, self.cls, self.name, self.make = entry, cls, name, make
        self.attached = False

    def attach(self) -> None:
        if self.attached:
            return
        key = (self.cls, self.name)
        patches = _CLASS_PATCHES.get(key)
        if patches is None:
            patches = _CLASS_PATCHES[key] = _ClassPatches(self.cls.__dict__[self.name])
        patches.entries.setdefault(self.entry, [self.make, 0])[1] += 1
        self.attached = True
        self._compose(patches)

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        key = (self.cls, self.name)
        patches = _CLASS_PATCHES[key]
        count = patches.entries[self.entry]
        count[1] -= 1
        if count[1] == 0:
            del patches.entries[self.entry]
        if not patches.entries:
            del _CLASS_PATCHES[key]
        self._compose(patches)

    def _compose(self, patches: _ClassPatches) -> None:
        function = patches.shipped
        for entry in sorted(patches.entries, key=_position, reverse=True):  # the last in the order innermost
            function = patches.entries[entry][0](function)
        setattr(self.cls, self.name, function)


class NamedOnly:
    """A Hook that changes nothing on the model: a per-call mechanism that is handed to the
    model's code (a StoppingCriteria) and is listed while it is in use."""

    torch_hooks = False

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass


def _position(name: str) -> int:
    try:
        return HOOK_ORDER.index(name)
    except ValueError:
        raise ValueError(f"unknown hook name {name!r}: add it to registry.HOOK_ORDER (docs/hooks.md)") from None


class HookRegistry:
    """The named hooks of one model, kept (and executed) in ``HOOK_ORDER``."""

    def __init__(self) -> None:
        self._entries: dict[str, Hook] = {}

    def names(self) -> list[str]:
        """Installed names, in execution order."""
        return list(self._entries)

    def get(self, name: str) -> Hook | None:
        return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def install(self, name: str, hook: Hook) -> bool:
        """Attach ``hook`` as ``name`` in its place of the order. Idempotent: a name already
        installed stays as it is (False); remove it first to replace it. True when installed now."""
        pos = _position(name)
        if name in self._entries:
            return False
        later = [n for n in self._entries if _position(n) > pos and getattr(self._entries[n], "torch_hooks", True)]
        for n in reversed(later):  # the last-registered torch hooks come off first
            self._entries[n].detach()
        try:
            hook.attach()
        except BaseException:
            hook.detach()
            raise
        finally:
            for n in later:
                self._entries[n].attach()
        self._entries[name] = hook
        self._entries = dict(sorted(self._entries.items(), key=lambda item: _position(item[0])))
        log.debug("hook %s installed (%s)", name, ", ".join(self._entries))
        return True

    def remove(self, name: str) -> bool:
        """Detach ``name``; False when it was not installed."""
        hook = self._entries.pop(name, None)
        if hook is None:
            return False
        hook.detach()
        return True

    def remove_all(self) -> None:
        """Detach every entry, the last in the order first."""
        for name in reversed(list(self._entries)):
            self.remove(name)

    @contextlib.contextmanager
    def active(self, name: str, hook: Hook) -> Iterator[Hook]:
        """``hook`` installed as ``name`` for the ``with`` block (a per-call hook)."""
        if not self.install(name, hook):
            raise RuntimeError(f"hook {name!r} is already installed (a call inside another call?)")
        try:
            yield hook
        finally:
            if self._entries.get(name) is hook:
                self.remove(name)


_REGISTRIES: weakref.WeakKeyDictionary[Any, HookRegistry] = weakref.WeakKeyDictionary()


def registry(model: Any) -> HookRegistry:
    """The registry of ``model`` (made on first use). Kept beside the model, not on it: the model
    carries no attribute of the pack's."""
    reg = _REGISTRIES.get(model)
    if reg is None:
        reg = _REGISTRIES[model] = HookRegistry()
    return reg


def hook_names(model: Any) -> list[str]:
    """The names installed on ``model``, in execution order (an empty list for a model never hooked)."""
    reg = _REGISTRIES.get(model)
    return reg.names() if reg is not None else []


def remove_all_hooks(model: Any) -> None:
    """Take every hook of the pack off ``model``: the official model's forward is back."""
    reg = _REGISTRIES.get(model)
    if reg is not None:
        reg.remove_all()


def forward_hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks left on any module of ``model`` (tests, diagnostics)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

# -- for entries that move a call's values to another device (split_boundaries, cfg_rows) ---------
def move_to(value: Any, device: torch.device, memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``; other
    objects (a KV cache, numbers, strings) as they are. ``memo`` reuses copies of the same tensor."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if memo is not None:
            hit = memo.get(id(value))
            if hit is not None and hit[0] is value and hit[1].device == device:
                return hit[1]
        # to a GPU asynchronously (stream-ordered); to the CPU synchronously: an asynchronous
        # device-to-host copy may still be running when the CPU reads the result
        moved = value.to(device, non_blocking=device.type == "cuda")
        if memo is not None:
            memo[id(value)] = (value, moved)  # keeps the source alive, so its id is not reused
        return moved
    if isinstance(value, (tuple, list)):
        items = [move_to(v, device, memo) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value  # nothing moved: the same object
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict) and type(value) is dict:
        moved = {k: move_to(v, device, memo) for k, v in value.items()}
        return value if all(moved[k] is value[k] for k in value) else moved
    return value

# -- the expert fetch: the one coupling of two entries (moe_dispatch calls it, block_streaming sets it),
# kept here, below both, so that streaming imports nothing of the MoE dispatch (hooks/moe_dispatch.py).
Fetch = Callable[[list[int]], None]  # expert ids with tokens -> (copied into the block's slot)

_FETCH: weakref.WeakKeyDictionary[nn.Module, Fetch] = weakref.WeakKeyDictionary()
_TOPK: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _put(table: weakref.WeakKeyDictionary, block: nn.Module, value: Any) -> None:
    """``table[block] = value``; None takes the block out."""
    if value is None:
        table.pop(block, None)
    else:
        table[block] = value


def set_expert_fetch(block: nn.Module, fetch: Fetch | None) -> None:
    """``fetch(expert ids with tokens)`` runs in each gather_scatter call of ``block`` before its experts
    do (None: no callback)."""
    _put(_FETCH, block, fetch)


def expert_fetch(block: nn.Module) -> Fetch | None:
    return _FETCH.get(block)


def set_dispatched(block: nn.Module, topk: int | None) -> None:
    """``block``'s forward is the pack's gather_scatter with ``topk`` (None: its own forward again)."""
    _put(_TOPK, block, topk)


def dispatched_topk(block: nn.Module) -> int | None:
    """The top-k of ``block`` when its forward is gather_scatter (it calls the fetch); else None."""
    return _TOPK.get(block)
