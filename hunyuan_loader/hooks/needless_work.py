"""Work the official code does that its result does not need: three registry entries.

- ``rope_cache``: ``CachedRoPE`` ("If cache miss, compute and cache it", Instruct
  modeling_hunyuan_image_3.py:973-1022) never stores the ``seq_len`` / ``rope_image_info`` it compares
  against (they stay ``None``, M:980-981), so every forward misses: each text token and each diffusion
  step rebuilds the 2D RoPE table over ``max_position_embeddings`` positions (22,800 for the real model,
  M:2146-2150), about 20 kernels and a Python loop over the image sections per forward. The entry lets
  the official object hit its cache when the key is the one it last built for. The base model's code
  builds its RoPE once per generation (hunyuan.py:2310) and gets nothing.
- ``cache_end_once``: ``HunyuanStaticCache.update`` in text mode (``dynamic``) reads the cache's end with
  ``cache_position[-1].item()`` in EVERY layer (M:947-951, 964-968; base hunyuan.py:941-944, 957-961):
  32 host syncs per text token, each stalling the launch of the next layer. All layers of one forward get
  the same ``cache_position`` tensor, so the entry reads its end once and slices the same way after.
- ``last_logits`` (one generate call): the text stage's first forward puts EVERY prompt token through
  ``lm_head`` and upcasts the result (M:2276-2285: ``self.lm_head(hidden_states)``, then ``logits.float()``),
  while generation reads the last position only (transformers' ``_sample``: ``outputs.logits[:, -1, :]``).
  At 133,120 words that is 0.8 MB per prompt token: ~4.6 GB for an edit with one 1 MP reference image
  (~5,800 tokens), ~8.5 GB with two; the entry hands ``lm_head`` the last position only.

The first two give bit-identical outputs (the same tables, the same slices); ``last_logits`` the same
last-position logits up to the rounding of a GEMM over one row instead of many (every later text token
is a one-row GEMM anyway); the test checkpoint's think text and image come out identical.
Tests: tests/hooks/test_needless_work.py.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import Any

import torch

from .registry import ClassMethodPatch, ModuleHooks, registry


class _RopeMemory:
    """Stands in for ``model.cached_rope`` (an _AttributeSet-like entry): the official object does the
    work; this one remembers the key of the table that object holds and makes it hit when the key repeats."""

    torch_hooks = False

    def __init__(self, model: Any) -> None:
        # held weakly: the registry (kept beside the model, weakly keyed by it) holds this entry, and a
        # strong reference here would keep every unloaded model alive through it
        self.model_ref = weakref.ref(model)
        self.rope = model.cached_rope
        self.key: tuple | None = None

    def attach(self) -> None:
        model = self.model_ref()
        if model is not None and model.__dict__.get("cached_rope") is not self:
            model.cached_rope = self  # a plain attribute of the model (not a module)

    def detach(self) -> None:
        model = self.model_ref()
        if model is not None and model.__dict__.get("cached_rope") is self:
            model.cached_rope = self.rope
        self.key = None

    def __getattr__(self, name: str) -> Any:  # config, cos_cache, ...: the official object's
        if name in ("model_ref", "rope", "key"):  # not set yet (a copy): no recursion through self.rope
            raise AttributeError(name)
        return getattr(self.rope, name)

    def __call__(self, seq_len: int, device: Any, rope_image_info: Any = None, position_ids: Any = None) -> Any:
        # the table depends on exactly these (M:999-1005: build_batch_2d_rope of seq_len, image infos,
        # device and the config); inference mode too, so an inference tensor never meets autograd
        key = (seq_len, torch.device(device), copy.deepcopy(rope_image_info), torch.is_inference_mode_enabled())
        rope = self.rope
        hit = key == self.key and getattr(rope, "cos_cache", None) is not None
        saved = rope.seq_len, rope.rope_image_info
        if hit:  # what the official miss test (M:997) compares: equal, so it takes its "hit cache" branch
            rope.seq_len, rope.rope_image_info = seq_len, rope_image_info
        self.key = None  # a failed call leaves no key behind
        try:
            out = rope(seq_len, device, rope_image_info=rope_image_info, position_ids=position_ids)
        finally:
            rope.seq_len, rope.rope_image_info = saved  # the object as shipped code leaves it
        self.key = key
        return out


def install_rope_cache(model: Any) -> bool:
    """Let the Instruct / Distil ``CachedRoPE`` hit its cache (module docstring). Installed on a model
    whose ``cached_rope`` is the official class (Instruct and Distil; the base model has none).
    Idempotent; True when installed now."""
    rope = getattr(model, "cached_rope", None)
    if isinstance(rope, _RopeMemory) or type(rope).__name__ != "CachedRoPE":
        return False
    if not all(hasattr(rope, name) for name in ("seq_len", "rope_image_info", "cos_cache")):
        return False
    return registry(model).install("rope_cache", _RopeMemory(model))


def _cache_end(update: Any) -> Any:
    def patched(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                cache_kwargs: Any = None) -> Any:
        position = (cache_kwargs or {}).get("cache_position")
        rows_ok = position is not None and (position.dim() == 1 or (position.dim() == 2 and len(position) == 1))
        if not getattr(self, "dynamic", False) or not rows_ok:
            return update(self, key_states, value_states, layer_idx, cache_kwargs)  # as shipped (its asserts too)
        self.dynamic = False  # the shipped update writes the rows, then returns the whole cache
        try:
            k_out, v_out = update(self, key_states, value_states, layer_idx, cache_kwargs)
        finally:
            self.dynamic = True
        end = _end_of(self, position, layer_idx)
        return k_out[:, :, :end], v_out[:, :, :end]  # the official slices (M:950-951, 967-968)

    return patched


def _end_of(cache: Any, position: torch.Tensor, layer_idx: int) -> int:
    """``position``'s last index + 1, read from the device once per forward: again at the first layer of
    every forward, and whenever another tensor comes (held weakly: a freed tensor's id may be reused by
    the next token's) or this one changed in place (its version; inference tensors have none)."""
    version = None if position.is_inference() else position._version
    memo = cache.__dict__.get("_end_memo")
    if layer_idx != 0 and memo is not None and memo[0]() is position and memo[1] == version:
        return memo[2]
    end = int(position.reshape(-1)[-1].item()) + 1  # M:949 cache_position[-1], M:966 cache_position[0, -1]
    cache.__dict__["_end_memo"] = (weakref.ref(position), version, end)
    return end


def install_cache_end_once(model: Any) -> bool:
    """Read the text stage's KV cache end once per forward instead of once per layer (module docstring).
    Installed on a model whose module defines ``HunyuanStaticCache`` with its own ``update`` (the official
    code and the test checkpoint). Idempotent; True when installed now."""
    module = sys.modules.get(type(model).__module__)
    cls = getattr(module, "HunyuanStaticCache", None)
    if not isinstance(cls, type) or "update" not in cls.__dict__:
        return False
    return registry(model).install("cache_end_once", ClassMethodPatch("cache_end_once", cls, "update", _cache_end))


class LastLogits(ModuleHooks):
    """A one-call entry: ``lm_head`` of a forward over several positions gets the last one only (module
    docstring). Its output is ``[rows, 1, vocab]``, which is all ``generate`` reads."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def hooks(self) -> list[tuple[torch.nn.Module, str, Any]]:
        return [(self.head, "pre", _last_position)]


def _last_position(_module: torch.nn.Module, args: tuple) -> tuple | None:
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1:
        return (hidden[:, -1:, :], *args[1:])
    return None


def last_logits(model: Any) -> LastLogits | None:
    """The ``last_logits`` entry for one generate call, or None for a model without an ``lm_head``."""
    head = getattr(model, "lm_head", None)
    return LastLogits(head) if isinstance(head, torch.nn.Module) else None
