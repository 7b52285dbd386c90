"""CFG-parallel: the conditional and unconditional rows of each diffusion forward on different devices.

The official pipeline runs both CFG halves as ONE batch of 2 rows per step through the model
(hunyuan_image_3_pipeline.py:833-846: ``torch.cat([latents] * cfg_factor)``, one
``self.model(**model_inputs)``, then ``pred.chunk(2)``). Almost all of that forward is the
decoder stack ``model.model`` (32 MoE blocks); the patch embedding, the final layer and the
VAE around it are small. So when every device can hold a copy of the decoder, each device
keeps a replica and the decoder's forward is replaced, on the instance (the checkpoint's code
is not edited), by a wrapper that:

1. splits every batch-major input (a tensor whose first dimension is the batch: hidden states,
   attention mask, position ids, per-row indices, a batched rope) into one slice per device;
   a KV cache gets one cache per device (transformers' cache layers allocate lazily, on the
   device and with the batch of the first keys they see); anything else is passed as is;
2. runs replica ``r`` on device ``r`` in its own thread, on its own CUDA stream, while the
   first device runs its slice in the calling thread (grad / inference / autocast state is
   carried into the threads);
3. brings the results back to the first device and concatenates them in row order.

A forward whose batch does not divide over the devices (the Instruct text stage, a
CFG-distilled checkpoint) runs on the first device alone. Weights: resident blocks are copied
to each device; blocks the plan streams share the first device's pinned host buffer (each
device streams them through its own slots), so a replica costs no host RAM.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...memory.residency.packed import PackedBlock
from ...memory.residency.streaming import BlockStreamer
from ...memory.residency.weights import TensorRef, weight_tensors
from ..core.units import GIB
from .registry import move_to, registry
from .streaming import StreamingHooks

log = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


class ReplicaError(RuntimeError):
    """The decoder could not be replicated (a weight whose holder the copy does not have)."""


# -- replicas -------------------------------------------------------------------------------------
@dataclass
class Replica:
    """A copy of the decoder on ``device``; streamed blocks share the original's host buffers."""

    device: torch.device
    module: nn.Module
    streamer: BlockStreamer | None = None
    owned_bytes: int = 0  # weights copied to ``device`` for this replica (shared ones not counted)

    def gpu_bytes(self) -> int:
        """Weight bytes this replica adds on its device: its own copies and its streaming slots."""
        if self.device.type != "cuda":
            return 0
        return self.owned_bytes + (self.streamer.gpu_bytes if self.streamer is not None else 0)

    def close(self) -> None:
        """Remove the streaming hooks, free the slots and every weight this replica owns."""
        from ...memory.unload import strip_module_weights

        registry(self.module).remove_all()  # its MoE dispatch and block streaming entries
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        strip_module_weights(self.module)


def clone_decoder(
    decoder: nn.Module,
    device: torch.device | str,
    *,
    blocks_attr: str = "layers",
    packed: dict[int, PackedBlock] | None = None,
    n_slots: int = 2,
    keep: Sequence[Any] = (),
    copy_same_device: bool = False,
) -> Replica:
    """A copy of ``decoder`` on ``device``, weights copied bit-exactly (bf16, W8A16 int8 + scales,
    bnb state: every tensor ``weight_tensors`` finds, its aliases kept). Blocks in ``packed``
    (index -> the original's PackedBlock: the streamed ones) keep pointing at the original's
    pinned host buffer and get a BlockStreamer of their own on ``device``. Weights already on
    ``device`` are shared unless ``copy_same_device`` (tests). Hooks are not copied; objects in
    ``keep`` (the top-level model, say) are shared, never copied."""
    device = torch.device(device)
    originals = weight_tensors(decoder)
    saved = [w.tensor for w in originals]
    memo: dict[int, Any] = {id(k): k for k in keep}
    stashed: list[tuple[nn.Module, str, Any]] = []
    try:
        for w in originals:  # deepcopy the structure, not the weights
            w.assign(torch.empty(1, dtype=w.tensor.dtype))
        for m in decoder.modules():  # nor the hooks, nor an instance forward (a registry entry: the
            # replica gets its own entries)
            for name in _HOOK_DICTS:
                if m.__dict__.get(name):
                    stashed.append((m, name, m.__dict__[name]))
                    m.__dict__[name] = type(m.__dict__[name])()
            fwd = m.__dict__.get("forward")
            if fwd is not None:
                stashed.append((m, "forward", fwd))
                del m.__dict__["forward"]
        replica = copy.deepcopy(decoder, memo)
    finally:
        for w, t in zip(originals, saved):
            w.assign(t)
        for m, name, value in stashed:
            m.__dict__[name] = value
    host = {t.data_ptr() for pb in (packed or {}).values() for t in pb.host_views}
    owned = 0
    with torch.no_grad(), torch.inference_mode(False):
        for w in originals:
            src = w.tensor
            if src.device.type == "cpu" and src.data_ptr() in host:
                new = src  # a streamed block's pinned master copy
            elif src.device == device and not copy_same_device:
                new = src  # same device (logical replicas, CPU): read-only, shared
            else:
                new = src.to(device, copy=True)
                owned += w.nbytes
            for ref in w.refs:
                owner = memo.get(id(ref.owner))
                if owner is None:
                    raise ReplicaError(
                        f"cannot replicate the decoder: a {type(src).__name__} held by a "
                        f"{type(ref.owner).__name__} ({ref.kind} {ref.name}) has no copy in the replica"
                    )
                TensorRef(owner, ref.name, ref.kind).set(new)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    streamer = None
    if packed:
        blocks = getattr(replica, blocks_attr)
        shared = {i: pb.shared_with(blocks[i]) for i, pb in packed.items()}
        streamer = BlockStreamer(blocks, shared, device, n_slots, attach=False)
        registry(replica).install("block_streaming", StreamingHooks([streamer]))
    return Replica(device, replica, streamer, owned)


# -- the batch split ------------------------------------------------------------------------------
def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a requirement
        return False
    return isinstance(value, Cache)


def _cache_started(cache: Any) -> bool:
    """Whether a transformers cache already holds keys (a started cache cannot be split by rows)."""
    for layer in getattr(cache, "layers", None) or ():
        if getattr(layer, "keys", None) is not None:
            return True
    return bool(getattr(cache, "key_cache", None))


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of the decoder's input: inputs_embeds, input_ids, hidden_states or the first tensor."""
    for key in ("inputs_embeds", "input_ids", "hidden_states"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def _find_caches(value: Any, out: list) -> None:
    if _is_cache(value):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _find_caches(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _find_caches(v, out)


def take_rows(value: Any, batch: int, start: int, stop: int, caches: dict[int, Any]) -> Any:
    """``value`` with every batch-major tensor cut to rows [start, stop) and each cache replaced
    by ``caches[id(cache)]``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() >= 1 and value.shape[0] == batch else value
    if id(value) in caches:
        return caches[id(value)]
    if isinstance(value, tuple):
        items = [take_rows(v, batch, start, stop, caches) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [take_rows(v, batch, start, stop, caches) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: take_rows(v, batch, start, stop, caches) for k, v in value.items()}
    return value


def merge_rows(outs: Sequence[Any], originals: dict[int, Any]) -> Any:
    """The per-device results as one: tensors concatenated along the batch, containers merged
    item by item, a per-device cache mapped back to the caller's cache."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(outs), dim=0) if first.dim() >= 1 else first
    if id(first) in originals:
        return originals[id(first)]
    if isinstance(first, dict):  # ModelOutput (BaseModelOutputWithPast) and plain dicts
        merged = {k: merge_rows([o[k] for o in outs], originals) for k in first.keys()}
        return type(first)(**merged) if type(first) is not dict else merged
    if isinstance(first, tuple):
        items = [merge_rows([o[i] for o in outs], originals) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, list):
        return [merge_rows([o[i] for o in outs], originals) for i in range(len(first))]
    return first


_STREAMS: dict[tuple[torch.device, int], Any] = {}


def _stream(device: torch.device, slot: int) -> Any:
    """One CUDA stream per (device, replica) for the whole process: cuBLAS keeps a workspace per
    stream, so new streams at every load would leave workspaces behind."""
    key = (device, slot)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


@dataclass(frozen=True)
class _ThreadState:
    grad: bool
    inference: bool
    autocast: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def capture(cls) -> _ThreadState:
        autocast = []
        for dev in ("cuda", "cpu"):
            try:
                if torch.is_autocast_enabled(dev):
                    autocast.append((dev, torch.get_autocast_dtype(dev)))
            except (TypeError, RuntimeError):  # an older torch without the device argument
                pass
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), tuple(autocast))

    def enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(torch.inference_mode(self.inference))
        stack.enter_context(torch.set_grad_enabled(self.grad))
        for dev, dtype in self.autocast:
            stack.enter_context(torch.autocast(device_type=dev, dtype=dtype))


class CfgParallel:
    """Replaces ``decoder.forward`` (on the instance) by the row-splitting wrapper over
    ``replicas`` (the first entry runs ``decoder`` itself on ``primary``): the registry entry
    ``cfg_rows``. ``attach=False``: the wrapper goes on when the registry attaches the entry."""

    torch_hooks = False

    def __init__(self, decoder: nn.Module, primary: torch.device | str, replicas: Sequence[Replica], *,
                 attach: bool = True) -> None:
        self.decoder = decoder
        self.primary = torch.device(primary)
        self.replicas = list(replicas)
        self.devices = [self.primary] + [r.device for r in self.replicas]
        self.enabled = True
        self._warm = False
        self.calls = 0
        self.parallel_calls = 0
        self.last_seconds = 0.0
        self._caches: dict[int, tuple[weakref.ref, list[Any]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.replicas)), thread_name_prefix="cfg-parallel")
        self._streams = [_stream(r.device, i) if r.device.type == "cuda" else None for i, r in enumerate(self.replicas)]
        self._previous: Any = None
        self._original: Callable[..., Any] = decoder.forward
        self._attached = False
        if attach:
            self.attach()

    def attach(self) -> None:
        if self._attached:
            return
        self._previous = self.decoder.__dict__.get("forward")
        self._original = self.decoder.forward
        self.decoder.forward = self._forward
        self._attached = True

    def detach(self) -> None:
        """Put the decoder's forward back (the threads stay: ``attach`` may follow)."""
        if self._attached and self.decoder.__dict__.get("forward") == self._forward:
            if self._previous is None:
                del self.decoder.forward
            else:
                self.decoder.forward = self._previous
        self._attached = False

    @property
    def n(self) -> int:
        return len(self.devices)

    def _replica_caches(self, found: list[Any]) -> dict[int, list[Any]] | None:
        """Per-device caches for each cache found (made once per cache, before it holds keys)."""
        for key in [k for k, (ref, _) in self._caches.items() if ref() is None]:
            del self._caches[key]
        out: dict[int, list[Any]] = {}
        for cache in found:
            entry = self._caches.get(id(cache))
            if entry is None or entry[0]() is not cache:
                if _cache_started(cache):
                    return None
                entry = (weakref.ref(cache), [cache] + [copy.deepcopy(cache) for _ in self.replicas])
                self._caches[id(cache)] = entry
            out[id(cache)] = entry[1]
        return out

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        batch = batch_size(args, kwargs)
        if not self.enabled or batch is None or batch < self.n or batch % self.n:
            return self._original(*args, **kwargs)
        found: list[Any] = []
        _find_caches((args, kwargs), found)
        with self._lock:
            per_cache = self._replica_caches(found)
        if per_cache is None:
            log.warning("CFG-parallel: a KV cache that already holds keys cannot be split; this forward runs "
                        "on %s alone", self.primary)
            return self._original(*args, **kwargs)
        t0 = time.perf_counter()
        self.parallel_calls += 1
        rows = batch // self.n
        state = _ThreadState.capture()
        ready = None
        if self.primary.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.primary))
        originals = {id(c): caches[0] for caches in per_cache.values() for c in caches}

        def part(r: int) -> tuple[tuple, dict]:
            caches = {key: caches[r] for key, caches in per_cache.items()}
            return (take_rows(args, batch, r * rows, (r + 1) * rows, caches),
                    take_rows(kwargs, batch, r * rows, (r + 1) * rows, caches))

        if not self._warm:  # the first time one after another: lazy set-ups (kernel autotuning, cuBLAS
            # handles, Triton compiles) then happen in one thread at a time
            self._warm = True
            a0, k0 = part(0)
            outs = [self._original(*a0, **k0)]
            for i in range(len(self.replicas)):
                outs.append(self._pool.submit(self._run_replica, i, part(i + 1), state, ready).result())
            return merge_rows(outs, originals)
        futures = [self._pool.submit(self._run_replica, i, part(i + 1), state, ready)
                   for i in range(len(self.replicas))]
        try:
            a0, k0 = part(0)
            outs = [self._original(*a0, **k0)]
        finally:
            results = []
            for f in futures:
                try:
                    results.append(f.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after every thread ended
                    results.append(exc)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        outs += results
        merged = merge_rows(outs, originals)
        self.last_seconds = time.perf_counter() - t0
        return merged

    def _run_replica(self, i: int, inputs: tuple[tuple, dict], state: _ThreadState, ready: Any) -> Any:
        replica, stream = self.replicas[i], self._streams[i]
        with contextlib.ExitStack() as stack:
            state.enter(stack)
            if stream is not None:
                stack.enter_context(torch.cuda.device(replica.device))
                stack.enter_context(torch.cuda.stream(stream))
                if ready is not None:
                    stream.wait_event(ready)
            args, kwargs = move_to(inputs[0], replica.device), move_to(inputs[1], replica.device)
            out = move_to(replica.module(*args, **kwargs), self.primary)
            if stream is not None:
                stream.synchronize()
            return out

    def close(self) -> None:
        """Put the decoder's forward back and stop the threads (the replicas stay as they are)."""
        self.detach()
        self._pool.shutdown(wait=True)
        self._caches.clear()


# -- residency ------------------------------------------------------------------------------------
class CfgParallelResidency:
    """The first device's ResidencyManager (the whole model) plus a replica of the decoder on each
    other device, seen as one residency by the cache, the offload policy and the unload nodes.
    Soft Unload drops the replicas (their weights are copies) and parks the model; the restore
    brings the model back and copies the replicas again. ``prepare_replica(module)`` is called on
    each new replica's decoder (the loader installs the MoE dispatch there, as on the model)."""

    def __init__(self, model: nn.Module, manager: Any, devices: Sequence[torch.device | str], *,
                 prepare_replica: Callable[[nn.Module], None] | None = None) -> None:
        self.model = model
        self.manager = manager
        self.devices = [torch.device(manager.device)] + [torch.device(d) for d in devices[1:]]
        self.prepare_replica = prepare_replica
        self.parallel: CfgParallel | None = None
        self._short_primary = 0
        self.last_note = ""
        self._build()

    def _build(self) -> None:
        from ...memory.unload import track_model

        plan = self.manager.plan
        streamed = list(plan.streamed) if plan is not None else []
        packed = {i: self.manager._packed[i] for i in streamed} or None  # the master copies in pinned RAM
        replicas: list[Replica] = []
        try:
            for dev in self.devices[1:]:
                rep = clone_decoder(self.model.model, dev, packed=packed,
                                    n_slots=plan.n_slots if plan is not None and streamed else 2, keep=[self.model])
                if self.prepare_replica is not None:
                    self.prepare_replica(rep.module)
                track_model(rep.module)
                replicas.append(rep)
        except BaseException:
            for rep in replicas:
                rep.close()
            raise
        self.parallel = CfgParallel(self.model.model, self.devices[0], replicas, attach=False)
        registry(self.model).install("cfg_rows", self.parallel)
        log.info("CFG-parallel over %s (%.2f GiB of replica weights)", ", ".join(map(str, self.devices)),
                 sum(r.gpu_bytes() for r in replicas) / GIB)

    def _drop(self) -> int:
        if self.parallel is None:
            return 0
        freed = sum(r.gpu_bytes() for r in self.parallel.replicas)
        if registry(self.model).get("cfg_rows") is self.parallel:
            registry(self.model).remove("cfg_rows")
        self.parallel.close()
        for rep in self.parallel.replicas:
            rep.close()
        self.parallel = None
        return freed

    # -- what callers read -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def managers(self) -> list[Any]:
        """The first device's manager (the replicas stream through their own registries)."""
        return [self.manager]

    @property
    def plan(self) -> Any:
        return self.manager.plan

    @property
    def state(self) -> Any:
        return self.manager.state

    @property
    def block_bytes(self) -> list[int]:
        return self.manager.block_bytes

    @property
    def other_bytes(self) -> int:
        return self.manager.other_bytes

    @property
    def prefetch_slots(self) -> int:
        return self.manager.prefetch_slots

    def gpu_bytes(self) -> int:
        return sum(self.gpu_bytes_by_device().values())

    def gpu_bytes_by_device(self) -> dict[str, int]:
        out = {str(self.devices[0]): int(self.manager.gpu_bytes())}
        for rep in self.parallel.replicas if self.parallel is not None else ():
            out[str(rep.device)] = out.get(str(rep.device), 0) + rep.gpu_bytes()
        return out

    def describe(self) -> str:
        return (f"CFG-parallel over {', '.join(map(str, self.devices))}: the decoder on each, the conditional "
                "and unconditional rows of each step on different devices at once")

    # -- one run ---------------------------------------------------------------------------
    def extra_needed(self, need: int, notes: list[str] | None = None) -> tuple[int, int]:
        """The first device runs the non-block parts on both rows and its row of the decoder; each
        replica one row of the decoder (about half the activations). A replica short of room turns
        CFG-parallel off for this run (the first device runs both rows). Returns (the first
        device's usable bytes, its shortfall)."""
        from ...memory.devices import usable_vram

        unlimited = 1 << 50
        usable = [usable_vram(d) if d.type == "cuda" else unlimited for d in self.devices]
        short = [d for d, u in zip(self.devices[1:], usable[1:]) if u < need // 2]
        if self.parallel is not None:
            self.parallel.enabled = not short
        if self.parallel is None:
            self.last_note = "CFG-parallel: the replicas are not loaded; both CFG rows run on " + str(self.devices[0])
        elif short:
            self.last_note = (f"CFG-parallel off for this run: {', '.join(map(str, short))} has less than "
                              f"{need / 2 / GIB:.1f} GiB free for one row's activations; both rows run on "
                              f"{self.devices[0]}")
        else:
            self.last_note = (f"CFG-parallel: the conditional and unconditional rows run at once on "
                              f"{', '.join(map(str, self.devices))}")
        if notes is not None:
            notes.append(self.last_note + ".")
        self._short_primary = max(0, int(need) - usable[0])
        return usable[0], self._short_primary

    @contextlib.contextmanager
    def stream_extra(self, bytes_needed: int) -> Any:
        """More blocks streamed on the first device for one run (the replicas keep their copies)."""
        with self.manager.stream_extra(self._short_primary or int(bytes_needed)) as plan:
            yield plan

    def apply(self, plan: Any, **kwargs: Any) -> None:
        self.manager.apply(plan, **kwargs)

    # -- soft unload -----------------------------------------------------------------------
    def park(self, **kwargs: Any) -> Any:
        from ...memory.residency.protocol import ParkReport

        report = self.manager.park(**kwargs)  # checks RAM first: if it refuses, nothing changed
        freed = self._drop()
        return ParkReport(report.moved_bytes, report.freed_bytes + freed, report.seconds)

    def restore(self, **kwargs: Any) -> float:
        t0 = time.perf_counter()
        self.manager.restore(**kwargs)
        if self.parallel is None:
            self._build()
        return time.perf_counter() - t0

    def wait_released(self) -> None:
        self.manager.wait_released()

    def close(self) -> None:
        self._drop()
        self.manager.close()
