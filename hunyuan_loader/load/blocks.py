"""Block-order loading: the model is materialised unit by unit (the non-block parts, then
decoder block 0, 1, 2, ...) straight to where the plan puts it.

Every unit is read from disk (``tensor_reader``), put on the compute device, quantized
there as its tensors arrive (bitsandbytes quantizes when an Int8Params / Params4bit moves
to the GPU), and, if the plan streams it, packed into its page-locked host buffer
(``memory.residency.PackedBlock``) before the next unit comes. Host RAM therefore holds
the streamed blocks plus the reader's ring; the GPU holds the resident part plus one unit.
On a machine without CUDA the device is the CPU and nothing streams (int8/nf4 quantize on
the CPU); the test checkpoint and the real model take the same path.

The model is built the way ``AutoModelForCausalLM.from_pretrained`` builds it in
transformers 4.57 (config, remote class, dtype, empty weights, bitsandbytes replacement,
fp32 exceptions, missing keys, tied weights, eval, generation_config, quantizer
post-processing), calling the same transformers functions; only the weight filling is
ours, because from_pretrained reads shard by shard through mmap into pageable memory and
places each tensor by ``device_map``: it cannot quantize on the GPU a block that then lives
in pinned RAM, nor hold less than the whole model in RAM on the way. One deliberate
difference: the routers (``mlp.gate.wg``) stay float32 under bitsandbytes, as the model
code creates them (``quantization.restore_float32_routers`` does the same after a
from_pretrained load); from_pretrained would cast them to bf16.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...memory.residency.packed import PackedBlock
from ...memory.residency.weights import weight_tensors
from ..checkpoint.layout import LoadUnit, TensorEntry
from ..checkpoint.reader import RingAhead, TensorReader
from ..core import hf_compat
from ..core.errors import CheckpointError
from ..core.units import aligned
from ..formats.quantization import ROUTER_SUFFIX
from ..formats.registry import for_model  # the built-ins are registered: pipeline imports formats.builtin

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], None]
CPU_READ_AHEAD = 256 << 20  # bytes a CPU load reads ahead of the tensor being placed

@dataclass
class Skeleton:
    """The model on the meta device, built as from_pretrained builds it, before any weight."""

    model: Any
    config: Any
    path: Path
    quant: str
    hf_quantizer: Any
    keep_in_fp32_regex: re.Pattern | None
    dtype: torch.dtype
    device_map: dict
    pre_quantized: bool
    to_load: list[str]  # checkpoint keys that are loaded (unexpected ones left out, as transformers does)
    missing: list[str]
    repo_kwargs: dict = field(default_factory=dict)
    # name -> dtype of every parameter and buffer once the skeleton is built (see _cast_dtype)
    tensor_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    unknown_ok: bool | None = None  # whether transformers casts nothing for a name the model lacks
    # transformers' answers for every tensor in ``to_load``, asked once when the skeleton is built
    # (_ask_transformers): the plan, the reader and the filling look them up
    _needs_quant: dict[str, bool] = field(default_factory=dict, repr=False)
    casts: dict[str, torch.dtype | None] = field(default_factory=dict, repr=False)  # see _cast_dtype
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)  # see _fill
    # the registered weight format the model's quantization_config names (formats/registry.py; None:
    # nothing quantized), looked up when the skeleton is built
    weight_format: Any = None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def needs_quantization(self, name: str) -> bool:
        """The quantizer's ``param_needs_quantization`` for a tensor the model loads, as asked when
        the skeleton was built (it depends only on the name and the final module class there). A
        name the model does not load is quantized by nothing: False."""
        return self._needs_quant.get(name, False)


@contextlib.contextmanager
def submodule_index(model: nn.Module):
    """``model.get_submodule`` answered from a dict while the body runs.

    transformers resolves the module of EVERY tensor it is handed (the quantizer's
    ``param_needs_quantization`` / ``create_quantized_param``, ``get_parameter_or_buffer``) with
    ``model.get_submodule(dotted_name)``, a hasattr/getattr walk per level: ~20 us a tensor, 0.1 s
    on a pre-quantized NF4 load of 5 real layers (six tensors per Linear). The module tree does not
    change while weights are filled in (only parameters are replaced), so one index of every path
    answers the same; a name not in it goes to the original method (same error). The instance
    attribute is removed afterwards, so the model the caller gets is untouched."""
    index = dict(model.named_modules(remove_duplicate=False))
    walk = model.get_submodule

    def get_submodule(target: str) -> nn.Module:
        found = index.get(target)
        return found if found is not None else walk(target)

    object.__setattr__(model, "get_submodule", get_submodule)
    try:
        yield
    finally:
        object.__delattr__(model, "get_submodule")


def _from_pretrained_kwargs(quant_config: Any, device: torch.device) -> dict[str, Any]:
    """What loading.py passed to from_pretrained (and so what we reproduce)."""
    kwargs: dict[str, Any] = dict(
        trust_remote_code=True,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        moe_impl="eager",
        low_cpu_mem_usage=True,
        device_map={"": device.index if device.type == "cuda" else device},
    )
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    return kwargs


def build_skeleton(path: Path, layout: Mapping[str, TensorEntry], quant: str, quant_config: Any,
                   device: torch.device) -> Skeleton:
    """The empty model, step for step as AutoModelForCausalLM.from_pretrained (transformers 4.57 or
    5.x, core/hf_compat.py) does it for our arguments, with the same functions; no weight is read.
    ``layout``: the checkpoint's header entries by name. Every per-tensor question the load asks
    transformers is answered here, once (``_ask_transformers``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

    path = Path(path)
    keys = list(layout)
    kwargs = _from_pretrained_kwargs(quant_config, device)
    # auto_factory: the config takes every kwarg but quantization_config; what it does not use goes on.
    config_kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
    config, model_kwargs = AutoConfig.from_pretrained(str(path), return_unused_kwargs=True, code_revision=None,
                                                      **config_kwargs)
    if "quantization_config" in kwargs:
        model_kwargs["quantization_config"] = kwargs["quantization_config"]
    for name in ("dtype", "device_map", "attn_implementation"):  # 5.x's config keeps these: from_pretrained's own
        if name not in model_kwargs and name in kwargs:
            model_kwargs[name] = kwargs[name]
    class_ref = config.auto_map["AutoModelForCausalLM"]
    model_class = get_class_from_dynamic_module(class_ref, str(path), code_revision=None)
    AutoModelForCausalLM.register(config.__class__, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class=AutoModelForCausalLM)
    model_class = add_generation_mixin_to_remote_model(model_class)

    built = hf_compat.empty_model(model_class, config, model_kwargs, str(path))
    model, hf_quantizer = built.model, built.hf_quantizer
    missing, unexpected = hf_compat.missing_and_unexpected(model, keys, hf_quantizer)
    skipped = set(unexpected)
    if skipped:
        log.warning("%d checkpoint tensors are not used by the model, e.g. %s", len(skipped), sorted(skipped)[0])
    sk = Skeleton(model, built.config, path, quant, hf_quantizer, hf_compat.keep_in_fp32_regex(built.keep_in_fp32),
                  built.dtype, built.device_map, bool(hf_quantizer is not None and hf_quantizer.pre_quantized),
                  [k for k in keys if k not in skipped], list(missing), {})
    _prepare_missing(sk)
    _ask_transformers(sk, layout)
    sk.weight_format = for_model(model)
    return sk


def _prepare_missing(sk: Skeleton) -> None:
    """Missing keys (in the model, not in the checkpoint) as from_pretrained treats them: put
    on the CPU and initialised; the loaded ones are marked initialised. Then fp32 modules."""
    model = sk.model
    if sk.missing:
        log.warning("%d model tensors are not in the checkpoint and get initialised, e.g. %s",
                    len(sk.missing), sk.missing[0])
    with submodule_index(model):  # both look up every tensor's module by name
        hf_compat.prepare_missing(model, sk.missing, sk.dtype, sk.hf_quantizer)
    if sk.keep_in_fp32_regex is not None:
        for name, param in model.named_parameters():
            if sk.keep_in_fp32_regex.search(name):
                param.data = param.data.to(torch.float32)
    sk.tensor_dtypes = {name: t.dtype for name, t in model.named_parameters(remove_duplicate=False)}
    for name, t in model.named_buffers(remove_duplicate=False):
        sk.tensor_dtypes.setdefault(name, t.dtype)


def _ask_transformers(sk: Skeleton, layout: Mapping[str, TensorEntry]) -> None:
    """transformers' per-tensor answers for every tensor the model loads, in one pass: whether the
    quantizer replaces it and the dtype it is cast to. Neither changes once the skeleton is built,
    and the plan, the reader and the filling ask both for every tensor: from here on they look
    them up instead of walking the module tree again."""
    with submodule_index(sk.model):  # the quantizer looks up every tensor's module by name
        for name in sk.to_load:
            sk._needs_quant[name] = hf_compat.needs_quantization(sk.model, sk.hf_quantizer, name)
        for name in sk.to_load:
            sk.casts[name] = _cast_dtype(sk, name, layout[name].dtype)


# -- sizes for the plan ------------------------------------------------------------------------------
def placed_nbytes(sk: Skeleton, entry: TensorEntry) -> int:
    """Bytes ``entry`` will take once placed (quantized or cast), as the residency engine counts
    them (256-byte aligned), from the header only."""
    if not sk.needs_quantization(entry.name):
        if entry.dtype.is_floating_point and entry.dtype.itemsize > 1:
            dtype = sk.casts.get(entry.name) or entry.dtype
            return aligned(entry.nbytes // entry.dtype.itemsize * dtype.itemsize)
        return aligned(entry.nbytes)
    if sk.pre_quantized:  # stored as it will live; bnb's packed metadata becomes python values
        return sk.weight_format.stored_bytes(entry.name, entry.nbytes)
    return sk.weight_format.placed_bytes(entry.shape, entry.dtype.itemsize, True)  # the format's size model


def unit_bytes(sk: Skeleton, units: list[LoadUnit]) -> list[int]:
    """Placed bytes of each unit (see placed_nbytes), from the headers only."""
    return [sum(placed_nbytes(sk, e) for e in u.entries) for u in units]


# -- filling -------------------------------------------------------------------------------------------
def _infer_dtype(sk: Skeleton, name: str, checkpoint_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype transformers casts a checkpoint tensor to (``hf_compat.load_dtype``: 4.57's
    _infer_parameter_dtype, 5.x's loading rule), answered from ``sk.tensor_dtypes``: transformers
    looks the parameter up by walking the module tree (get_parameter_or_buffer), ~0.1 ms a tensor,
    which is seconds on the real model's tens of thousands of tensors (NF4 copies: six per Linear)."""
    created = sk.tensor_dtypes.get(name)
    if created is None and sk.unknown_ok is None:  # transformers' own answer (None, or it raises) once
        hf_compat.check_unknown_tensor(sk.model, name, checkpoint_dtype, sk.keep_in_fp32_regex, sk.hf_quantizer)
        sk.unknown_ok = True
    return hf_compat.load_dtype(sk.model, name, checkpoint_dtype, created, sk.keep_in_fp32_regex, sk.hf_quantizer,
                                sk.dtype, sk.needs_quantization(name))


def _cast_dtype(sk: Skeleton, name: str, checkpoint_dtype: torch.dtype) -> torch.dtype | None:
    """transformers' cast, except that routers keep their float32 under bnb (5.x does that itself)."""
    casting = _infer_dtype(sk, name, checkpoint_dtype)
    if sk.hf_quantizer is not None and name.endswith(ROUTER_SUFFIX + ".weight") and casting is not None:
        try:
            return sk.model.get_parameter(name).dtype  # what the model code created (float32)
        except AttributeError:
            return casting
    return casting


def _fill(sk: Skeleton, entry: TensorEntry, value: torch.Tensor, device: torch.device) -> None:
    """Put one checkpoint tensor into the model on ``device`` (quantizing it there if its module
    is a bitsandbytes layer), as transformers' loading does (4.57 _load_state_dict_into_meta_model,
    5.x convert_and_load_state_dict_in_model)."""
    from accelerate.utils import set_module_tensor_to_device

    name = entry.name
    casting = sk.casts[name]
    target: Any = device.index if device.type == "cuda" else device
    hq = sk.hf_quantizer
    if sk.needs_quantization(name):
        if casting is not None:
            value = value.to(casting)
        if sk.pre_quantized and hf_compat.gathers_prequantized(hq) and value.device != device:
            # the module's stored tensors are kept until all of them have arrived: its own copy, not a
            # view of the read ring (which the reader reuses once released)
            value = value.to(device) if device.type == "cuda" else value.clone()
        if sk.pre_quantized and hf_compat.is_v5():
            module, key = hf_compat.module_and_key(name, hq)
            sk._pending.setdefault(module, {})[key] = value
            return
        hf_compat.quantize_into(sk.model, hq, name, value, target)
        return
    if casting is not None and device.type == "cuda" and value.dtype != casting:
        value = value.to(device).to(casting)  # cast on the GPU: same rounding, far faster than the CPU
    elif casting is not None:
        value = value.to(casting)
    set_module_tensor_to_device(sk.model, name, device, value=value, dtype=value.dtype, clear_cache=False)
    if hq is not None and name.endswith(ROUTER_SUFFIX + ".weight") and not hf_compat.is_v5():
        # as quantization.restore_float32_routers after from_pretrained on 4.57, which casts the router to
        # bf16; 5.x keeps it float32 (restore then changes nothing) and leaves requires_grad as created
        sk.model.get_parameter(name).requires_grad_(False)


def _unit_modules(sk: Skeleton, unit: LoadUnit) -> list[nn.Module]:
    if unit.block is not None:
        return list(sk.blocks[unit.block].modules())
    in_blocks = {id(m) for b in sk.blocks for m in b.modules()}
    return [m for m in sk.model.modules() if id(m) not in in_blocks]


@dataclass
class LoadStats:
    """What a load did and where its time went.

    ``phases`` holds the wall seconds of each step between "load called" and "load returned", in
    order (``phase()`` records one); ``seconds`` is the read+place step (materialise). Inside it,
    ``wait_seconds`` is the time the placing thread waited for the reader (disk-bound), and
    ``read_seconds`` the reader's time from its first byte to its last (``read_gbps``).
    """

    bytes_read: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # units in the order they were completed
    phases: dict[str, float] = field(default_factory=dict)
    wait_seconds: float = 0.0
    read_seconds: float = 0.0
    ring_seconds: float = 0.0  # allocating (and pinning) the reader's ring ...
    ring_ahead: bool = False  # ... on a helper thread while the skeleton was built (else inside read+place)
    read_early: bool = False  # the reader started before the skeleton was built (a load that quantizes nothing)
    tensors: int = 0
    reads: int = 0  # preadv calls the reader made

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the ``with`` body to ``phases[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / self.read_seconds if self.read_seconds > 0 else 0.0

    def compact(self) -> str:
        """The phases in a few characters each, for a table cell."""
        short = {"validate": "val", "skeleton": "skel", "checks": "chk", "read+place": "read", "finish": "fin",
                 "tokenizer": "tok", "moe dispatch": "moe", "from_pretrained": "from_pretrained"}
        parts = []
        for k, v in self.phases.items():
            text = f"{short.get(k, k)} {v:.2f}"
            if k == "read+place" and self.bytes_read:
                text += f" ({self.read_gbps:.2f} GB/s, waited {self.wait_seconds:.2f}, {self.reads} reads)"
            parts.append(text)
        if self.ring_seconds:
            parts.append(f"ring {self.ring_seconds:.2f} {'ahead' if self.ring_ahead else 'in read'}")
        if self.read_early:
            parts.append("read from before skel")
        return ", ".join(parts)

    def describe(self) -> str:
        """One line: every phase's seconds, the read rate and the time spent waiting on the disk."""
        parts = [f"{k} {v:.2f}" for k, v in self.phases.items()]
        total = sum(self.phases.values())
        line = f"{total:.2f} s = " + " + ".join(parts) if parts else f"{self.seconds:.2f} s"
        if self.bytes_read:
            line += (f"; read {self.bytes_read / 1e9:.2f} GB in {self.read_seconds:.2f} s ({self.read_gbps:.2f} GB/s, "
                     f"{self.tensors} tensors, {self.reads} reads), placing waited {self.wait_seconds:.2f} s")
        return line


def _transient(sk: Skeleton, entry: TensorEntry, device: torch.device) -> bool:
    """Whether a checkpoint tensor is only passing through host memory: everything on a GPU
    load; on a CPU load, the full-precision weights that get quantized (into new tensors)."""
    if device.type == "cuda":
        return True
    return (sk.hf_quantizer is not None and not sk.pre_quantized and entry.dtype.is_floating_point
            and sk.needs_quantization(entry.name))


def staging_bytes(sk: Skeleton, units: list[LoadUnit], device: torch.device) -> int:
    """The reader's ring. GPU load: page-locked, 1 GiB or twice the largest tensor (at most one
    unit): enough read-ahead to keep the disk busy while a block is quantized or packed. CPU load:
    ``CPU_READ_AHEAD`` for the tensors that get quantized (0 when none is: each tensor is kept in
    its own storage)."""
    transient = [e.nbytes for u in units for e in u.entries if _transient(sk, e, device)]
    if not transient:
        return 0
    if device.type != "cuda":
        return max(CPU_READ_AHEAD, max(transient))
    return _gpu_ring(max(transient), max((u.nbytes for u in units), default=0))


def _gpu_ring(largest_tensor: int, largest_unit: int) -> int:
    return max(largest_tensor, min(max(1 << 30, 2 * largest_tensor), largest_unit))


def gpu_staging_bytes(layout: dict[str, TensorEntry]) -> int:
    """staging_bytes of a GPU load, from the headers alone (every tensor passes through the ring),
    so the ring can be made while the skeleton is built. At least what staging_bytes gives once the
    skeleton is known (that one leaves out the tensors the model does not use)."""
    from ..checkpoint.layout import block_of

    units: dict[int | None, int] = {}
    for name, e in layout.items():
        units[block_of(name)] = units.get(block_of(name), 0) + e.nbytes
    if not layout:
        return 0
    return _gpu_ring(max(e.nbytes for e in layout.values()), max(units.values()))


def start_reader(transient: Collection[str] | None, entries: list[TensorEntry], device: torch.device,
                 ring_bytes: int, ring: Any = None) -> TensorReader:
    """The reader of ``entries`` for a load to ``device``: a ``ring_bytes`` ring (``ring`` made ahead: a
    HostBuffer or a RingAhead) for the tensors only passing through host memory (``transient``: their
    names, see ``_transient``; None: a load that quantizes nothing, whose transient tensors are known
    without the skeleton: all of them on a GPU, none on the CPU), a ``CPU_READ_AHEAD`` window on the CPU."""
    cuda = device.type == "cuda"
    if transient is None:
        def to_ring(e: TensorEntry) -> bool:
            return cuda
    else:
        def to_ring(e: TensorEntry) -> bool:
            return e.name in transient
    return TensorReader(entries, to_ring=to_ring, ring_bytes=ring_bytes, pin=cuda,
                        window=max(ring_bytes, CPU_READ_AHEAD if not cuda else 0), ring=ring)


def header_nbytes(entry: TensorEntry) -> int:
    """What ``entry`` takes once placed in a load that quantizes nothing (bf16, or a pre-quantized
    checkpoint), from the header alone: its bytes (256-byte aligned), a router counted as float32
    (kept float32 under bitsandbytes, ``_cast_dtype``). At least ``placed_nbytes``: this model has
    no ``_keep_in_fp32_modules`` (hunyuan_image_3/hunyuan.py: none), casts only narrow (fp32 -> bf16) and
    the pre-quantized metadata tensors count 0 once placed."""
    n = entry.nbytes
    if entry.name.endswith(ROUTER_SUFFIX + ".weight") and entry.dtype.is_floating_point and entry.dtype.itemsize < 4:
        n = n // entry.dtype.itemsize * 4
    return aligned(n)


class _HostBuffersAhead:
    """Allocates (page faults and pins) the host buffer of each streamed block on a helper thread,
    one block ahead, so packing a block is just its copy. Sizes are the plan's estimates plus
    slack; a buffer that turns out too small is ignored (PackedBlock then allocates its own)."""

    def __init__(self, sizes: dict[int, int], pin: bool) -> None:
        import threading

        self._order = sorted(sizes)
        self._sizes = sizes
        self._pin = pin
        self._ready: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hunyuan-host-buffers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ...memory.residency.packed import HostBuffer

        for i in self._order:
            with self._cond:
                while not self._stop and len(self._ready) >= 1:
                    self._cond.wait()
                if self._stop:
                    return
            size = self._sizes[i] + (1 << 20) + self._sizes[i] // 1000
            buf = HostBuffer(size, pin=self._pin)
            with self._cond:
                self._ready[i] = buf
                self._cond.notify_all()

    def take(self, i: int) -> Any:
        with self._cond:
            while i not in self._ready and not self._stop and self._thread.is_alive():
                self._cond.wait(timeout=0.5)
            buf = self._ready.pop(i, None)
            self._cond.notify_all()
            return buf

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()


class _Progress:
    """Reports bytes read of total, at most every 1% (and at the end)."""

    def __init__(self, total: int, fn: ProgressFn | None) -> None:
        self.total, self.fn, self.done, self.last = total, fn, 0, -1

    def add(self, n: int) -> None:
        self.done += n
        if self.fn is not None and (self.done - self.last >= self.total / 100 or self.done >= self.total):
            self.last = self.done
            self.fn(self.done, self.total)


@dataclass
class LoadJob:
    """One ``materialise`` call: what to read, where to put it, what to call on the way."""

    # what to read
    units: list[LoadUnit]
    # where to put it
    device: torch.device  # the non-block parts (and every block without ``block_devices``)
    block_devices: Sequence[torch.device] | None = None  # each block's device
    streamed: Iterable[int] = ()  # blocks packed into pinned host buffers once placed
    streamed_sizes: dict[int, int] | None = None  # their planned bytes: buffers prepared ahead on a thread
    # how it is read
    ring_bytes: int | None = None  # the reader's ring (None: ``staging_bytes``)
    ring: RingAhead | None = None  # the ring made ahead: used if it holds ``ring_bytes``, closed in any case
    reader: TensorReader | None = None  # a reader started ahead on exactly these units' entries (used, closed)
    # callbacks
    progress: ProgressFn | None = None  # (bytes read, bytes total)
    cancel: CancelFn | None = None  # between units; raises to stop
    stats: LoadStats | None = None

    def unit_device(self, unit: LoadUnit) -> torch.device:
        if self.block_devices is None or unit.block is None:
            return self.device
        return self.block_devices[unit.block]


def materialise(sk: Skeleton, job: LoadJob) -> dict[int, PackedBlock]:
    """Read and place every unit of ``job`` in order; returns the streamed blocks' packed host buffers.

    Units go to ``job.unit_device(unit)`` (issue 13: a model split over several GPUs). On any
    failure the partial weights are freed before the exception leaves (nothing stays alive, even
    if the traceback keeps the model object).
    """
    from ...memory.stats import malloc_trim
    from ...memory.unload import strip_module_weights

    units, device, ring, reader, cancel = job.units, job.device, job.ring, job.reader, job.cancel
    stats = job.stats if job.stats is not None else LoadStats()
    streamed = set(job.streamed)
    streamed_sizes = job.streamed_sizes
    cuda = device.type == "cuda"
    total = sum(u.nbytes for u in units)
    stats.bytes_total = total
    prog = _Progress(total, job.progress)
    ring_bytes = job.ring_bytes
    if ring_bytes is None:
        ring_bytes = staging_bytes(sk, units, device)
    entries = [e for u in units for e in u.entries]
    packed: dict[int, PackedBlock] = {}
    t0 = time.perf_counter()
    made = None
    if reader is not None:
        if len(reader.entries) != len(entries) or any(a is not b for a, b in zip(reader.entries, entries)):
            reader.close()
            raise ValueError("the reader started ahead reads other tensors than these units")
        stats.read_early = True
        if reader.ring_ahead is not None:
            stats.ring_seconds, stats.ring_ahead = reader.ring_ahead.seconds, True
        if ring is not None:
            ring.close()
    else:
        if ring is not None:
            if ring.nbytes >= ring_bytes > 0:
                made = ring.take()
                stats.ring_seconds, stats.ring_ahead = ring.seconds, True
            ring.close()
        if made is None and ring_bytes > 0:
            t_ring = time.perf_counter()
        transient = {e.name for e in entries if _transient(sk, e, device)}
        reader = start_reader(transient, entries, device, ring_bytes, made)
        if made is None and ring_bytes > 0:
            stats.ring_seconds = time.perf_counter() - t_ring
    stats.tensors = len(entries)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(reader.close)  # (idempotent) also when the failure came before the reading loop
        try:
            ahead = None
            if streamed and streamed_sizes:
                ahead = cleanup.enter_context(contextlib.closing(
                    _HostBuffersAhead({i: streamed_sizes.get(i, 0) for i in streamed}, cuda)))
            with torch.no_grad(), submodule_index(sk.model):
                for unit in units:
                    if cancel is not None:
                        cancel()
                    target = job.unit_device(unit)
                    for entry in unit.entries:
                        item = reader.next()
                        assert item.entry is entry
                        try:
                            # a CPU unit of a GPU load keeps its own copy (the ring is reused)
                            value = item.tensor.clone() if target.type != device.type else item.tensor
                            _fill(sk, entry, value, target)
                        finally:
                            item.release()
                        prog.add(entry.nbytes)
                    # 5.x: the pre-quantized modules whose stored tensors _fill gathered, rebuilt on the unit's device
                    hf_compat.deserialize_gathered(sk.model, sk.hf_quantizer, sk._pending,
                                                   target.index if target.type == "cuda" else target)
                    _follow_unit(_unit_modules(sk, unit), target)
                    if not cuda:  # give the unit's freed buffers back to the OS (glibc keeps them)
                        malloc_trim()
                    if unit.block is not None and unit.block in streamed:
                        host = ahead.take(unit.block) if ahead is not None else None
                        packed[unit.block] = PackedBlock(weight_tensors(sk.blocks[unit.block]), pin=cuda, host=host)
                    stats.order.append(unit.label)
                if cuda:
                    torch.cuda.synchronize(device)
                    if job.block_devices is not None:  # every other GPU the units went to
                        for dev in {job.unit_device(u) for u in units} - {device}:
                            if dev.type == "cuda":
                                torch.cuda.synchronize(dev)
            # Anything still on the meta device was in no file: an incomplete folder.
            unfilled = next((n for n, t in [*sk.model.named_parameters(), *sk.model.named_buffers()]
                             if t.device.type == "meta"), None)
            if unfilled is not None:
                raise CheckpointError(f"the checkpoint did not fill {unfilled}: the folder is incomplete. "
                                      "Re-download it.")
        except BaseException:
            packed.clear()
            strip_module_weights(sk.model)
            raise
    stats.bytes_read = reader.bytes_read
    stats.reads = reader.reads
    stats.wait_seconds = reader.wait_seconds
    stats.read_seconds = reader.read_seconds
    stats.seconds = time.perf_counter() - t0
    return packed


def _follow_unit(modules: list[nn.Module], device: torch.device) -> None:
    """Parameters and buffers the checkpoint does not hold (non-persistent buffers, initialised
    missing keys) go where their unit went, as from_pretrained's ``model.to(device)`` moves them.
    (bnb state is left where bnb put it: no normalisation, so resident units stay as
    from_pretrained leaves them.)"""
    for m in modules:
        for name, b in m._buffers.items():
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[name] = b.to(device)
        for p in m._parameters.values():
            if p is not None and p.device.type not in ("meta", device.type):
                p.data = p.data.to(device)


def finish(sk: Skeleton) -> Any:
    """What from_pretrained does after the weights: tied weights, eval, generation_config,
    device map, quantizer post-processing. Returns the model."""
    from transformers import GenerationConfig

    model = sk.model
    model.tie_weights()
    model.eval()
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(sk.path), _from_auto=True,
                                                                       _from_pipeline=None)
        except OSError:
            log.info("no generation_config.json: using the one derived from the model config")
    model.hf_device_map = dict(sk.device_map)
    if sk.hf_quantizer is not None:
        model.hf_quantizer = sk.hf_quantizer
        hf_compat.postprocess(sk.hf_quantizer, model, sk.config)
    return model
