"""Loading a checkpoint in bf16, int8 or nf4: validation, then block-order loading.

The default engine materialises the model block by block straight to where the offload
policy (placement.py) puts it, quantizing on the GPU as each block arrives (block_loader.py).
The 'accelerate' offload mode, and ``engine="from_pretrained"`` (the pack's earlier path,
kept for the load benchmark), go through ``AutoModelForCausalLM.from_pretrained`` instead.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...memory import stats
from ...memory.unload import strip_module_weights, track_model
from ..checkpoint.inspection import inspect_for_load
from ..checkpoint.prequantized import check_prequantized
from ..core import quiet
from ..core.errors import DependencyError
from ..core.spec import LoadedModel, LoadSpec
from ..formats import builtin  # noqa: F401 - the built-in weight formats registered before any lookup
from ..formats.quantization import restore_float32_routers
from ..formats.registry import check_quantized_modules
from ..hooks.standard import install_load_hooks, replica_hooks
from . import multi_gpu
from .adopt import adopt
from .placement import (
    accelerate_kwargs,
    check_load_ram,
    place_for_spec,
    plan_load,
    uses_accelerate,
    within_ram_limit,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], None]


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    spec: LoadSpec,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    engine: str = "blocks",
) -> LoadedModel:
    """Validate, load, prepare MoE dispatch and weight placement.

    ``progress(bytes_read, bytes_total)`` is called as weights are read; ``cancel()`` between
    blocks (it raises to stop). Not enough VRAM or RAM for the plan is refused before any weight
    is read. On any failure (or a cancel) nothing stays loaded: the partial model's weights are
    freed and memory released before the exception leaves.
    """
    from .blocks import LoadStats

    start = time.perf_counter()
    st = LoadStats()
    quiet.install()  # before bitsandbytes is imported: its messages that do not concern the user
    with st.phase("validate"):
        found = inspect_for_load(spec.path, spec.quant, spec.int8_format)
        device = multi_gpu.primary_device(spec)  # the first of spec.devices (auto: the current GPU)
    info, variant = found.info, found.variant
    model = residency = skeleton = None
    try:
        if engine == "blocks" and not uses_accelerate(spec):
            skeleton, residency = _load_blocks(spec, found, device, progress, cancel, st)
            model = skeleton.model
        else:
            with st.phase("from_pretrained"):
                model, residency = _load_from_pretrained(spec, found, device)
        with st.phase("tokenizer"):
            if hasattr(model, "load_tokenizer"):
                model.load_tokenizer(str(info.path))
        with st.phase("moe dispatch"):  # and the other hooks: the registry's order (docs/hooks.md)
            install_load_hooks(model, spec.moe_impl, device, residency.managers if residency is not None else ())
        loaded = LoadedModel(model, spec, info, variant, device, 0.0)
        loaded.residency = residency
        loaded.load_stats = st
        loaded.load_seconds = time.perf_counter() - start
        st.phases["other"] = max(0.0, loaded.load_seconds - sum(st.phases.values()))
        log.info("loaded %s in %.1f s (%s)", spec.describe(), loaded.load_seconds, variant.name)
        log.info("load phases: %s", st.describe())
        return loaded
    except BaseException as exc:
        if residency is not None:
            residency.close()
        for m in (model, getattr(skeleton, "model", None)):
            if m is not None:
                strip_module_weights(m)  # even if something keeps the object, its memory goes
        del model, residency, skeleton
        _clear_inner_frames(exc)
        gc.collect()
        stats.release_cached_memory()
        if device.type == "cpu" and _needs_cuda(exc):
            raise DependencyError(
                f"{info.path.name}'s own code needs a CUDA GPU: it allocates on CUDA while the model is built "
                "(the official Instruct VAE does `torch.empty(0, device=\"cuda\")`). Run it on a machine with an "
                "NVIDIA GPU and a CUDA build of torch."
            ) from None
        raise


def _needs_cuda(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (AssertionError, RuntimeError)) and (
        "Torch not compiled with CUDA enabled" in text or "Found no NVIDIA driver" in text
        or "No CUDA GPUs are available" in text
    )


def _clear_inner_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames below this one in the exception's traceback (the
    partial model, its packed blocks): whoever keeps the exception (ComfyUI shows it) keeps
    the line numbers, not the memory."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None  # this frame is still running
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:  # a frame that is still executing
            pass
        tb = tb.tb_next


def _load_blocks(spec, found, device, progress, cancel, st):
    """Plan from the headers, refuse before reading if the machine cannot hold the plan, then
    materialise block by block (blocks.py), adopt. Returns (skeleton, residency or None).

    One pipeline for one device and several: the spec's devices choose the planner (``plan_load``
    for the current device alone, ``multi_gpu.plan_load_on_devices`` otherwise), whose
    LoadPlacement (each block's device, the streamed blocks, the layout) the read, the placing and
    the adopt step (adopt.py) follow whatever it holds.

    A load that quantizes nothing (bf16, a pre-quantized checkpoint; no quantization_config) is planned
    from the headers first: its placed sizes are its header sizes (``block_loader.header_nbytes``),
    so once that plan has passed the reader starts, and the disk is busy while the skeleton is built
    (0.2-0.5 s per load on the H200: a tenth of a pre-quantized NF4 load of 5 real layers). The plan
    is then made again from the skeleton's exact sizes for the placement. A load that quantizes
    needs the skeleton for its sizes: the reader starts after that plan. On a GPU the reader's
    page-locked ring is allocated on a helper thread (pinning 1 GiB takes a few tenths of a second).
    No weight is read before a plan has passed."""
    from ..checkpoint.layout import load_units
    from ..checkpoint.reader import RingAhead
    from . import blocks

    ring = reader = None
    devices = multi_gpu.resolve_devices(spec.devices)  # once per load: checked against the machine
    single = len(devices) == 1 and devices[0] == multi_gpu.default_device()
    info, layout, qconfig = found.info, found.layout, found.quantization_config
    early = qconfig is None and single
    ram = None
    try:
        if early:
            with st.phase("plan"):
                ram, reader = _plan_from_headers_and_read(spec, info, layout, device)
        elif device.type == "cuda":
            ring = RingAhead(blocks.gpu_staging_bytes(layout), pin=True)
        with st.phase("skeleton"):
            sk = blocks.build_skeleton(found.loadable, layout, spec.quant, qconfig, device)
            units = load_units(layout, sk.to_load)
        with st.phase("checks"):
            if sk.hf_quantizer is not None:
                if found.pre_quantized:
                    check_prequantized(sk.model, layout.keys())
                else:
                    check_quantized_modules(sk.model)
            track_model(sk.model)  # Force Unload finds it from here (it holds no weight yet)
        with st.phase("plan"):
            staging = blocks.staging_bytes(sk, units, device)
            block_bytes = [0] * len(sk.blocks)
            other_bytes = 0
            for unit, nbytes in zip(units, blocks.unit_bytes(sk, units)):
                if unit.block is None:
                    other_bytes = nbytes
                else:
                    block_bytes[unit.block] = nbytes
            held = reader.ring_bytes if reader is not None else ring.nbytes if ring is not None else 0
            if held >= staging > 0:
                staging = held  # the ring made ahead is what the load holds
            entries = [e for u in units for e in u.entries]
            if reader is not None and (len(entries) != len(reader.entries)
                                       or any(a is not b for a, b in zip(entries, reader.entries))):
                reader.close()  # the model leaves some tensors out: read them in its order instead
                reader = None
            if single:
                placement = plan_load(spec, block_bytes, other_bytes, device, sk.config, staging_bytes=staging)
            else:
                placement = multi_gpu.plan_load_on_devices(
                    spec, sk, units, block_bytes, other_bytes, devices=devices,
                    replicable=found.weight_format.replicable, staging_bytes=staging)
            check_load_ram(spec, placement, ram if early else _ram_available(ring))
            sizes = {i: placement.plan.block_bytes[i] for i in placement.streamed} if placement.plan is not None \
                else None
        with st.phase("read+place"):
            job = blocks.LoadJob(units, placement.device, placement.block_devices, placement.streamed, sizes,
                                 ring_bytes=staging, ring=ring, reader=reader, progress=progress, cancel=cancel,
                                 stats=st)
            reader = None  # materialise owns (and closes) it from here
            packed = blocks.materialise(sk, job)
    finally:
        if reader is not None:
            reader.close()
        if ring is not None:
            ring.close()
    with st.phase("finish"):
        blocks.finish(sk)
    with st.phase("adopt"):
        return sk, adopt(sk.model, placement, packed, prepare_replica=replica_hooks(spec.moe_impl))


def _plan_from_headers_and_read(spec, info, layout, device) -> tuple[int, Any]:
    """For a load that quantizes nothing: the plan from the header sizes (raises, having read
    nothing, when the machine cannot hold it), then the reader started on every tensor in load
    order (its ring pinned on a helper thread). Returns (the RAM the plan counted as available,
    the reader)."""
    from ..checkpoint.layout import load_units
    from ..checkpoint.reader import RingAhead
    from .blocks import gpu_staging_bytes, header_nbytes, start_reader
    from .placement import available_ram

    units = load_units(layout)
    block_bytes = [0] * (1 + max((u.block for u in units if u.block is not None), default=-1))
    other_bytes = 0
    for u in units:
        nbytes = sum(header_nbytes(e) for e in u.entries)
        if u.block is None:
            other_bytes = nbytes
        else:
            block_bytes[u.block] = nbytes
    cuda = device.type == "cuda"
    staging = gpu_staging_bytes(layout) if cuda else 0
    ram = available_ram()  # before the ring is pinned: the plan counts the ring as staging
    placement = plan_load(spec, block_bytes, other_bytes, device, info.config, staging_bytes=staging)
    check_load_ram(spec, placement, ram)
    ring = RingAhead(staging, pin=True) if staging else None
    return ram, start_reader(None, [e for u in units for e in u.entries], device, staging, ring)


def _ram_available(ring: Any) -> int | None:
    """Host RAM for the plan when the ring is already made: what is available plus the ring (the
    plan counts the ring as staging), within HUNYUAN_RAM_LIMIT_GB as placement.available_ram."""
    held = ring.wait() if ring is not None else 0
    if not held:
        return None
    from ...memory.residency.ram import available_ram as os_available

    return within_ram_limit(os_available() + held)


def _load_from_pretrained(spec, found, device):
    """AutoModelForCausalLM.from_pretrained: the 'accelerate' offload mode (device_map auto), and
    the earlier path (on the CPU, then placement by the residency engine) for comparisons."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        trust_remote_code=True,
        dtype=torch.bfloat16,  # transformers >= 4.56 name (torch_dtype is deprecated)
        attn_implementation="sdpa",
        moe_impl="eager",
        low_cpu_mem_usage=True,
    )
    qconfig = found.quantization_config
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    accelerate = uses_accelerate(spec) and device.type == "cuda"
    if accelerate:
        kwargs.update(accelerate_kwargs(spec, device))
    else:
        kwargs["device_map"] = "cpu"  # the residency engine places blocks afterwards
    model = AutoModelForCausalLM.from_pretrained(str(found.loadable), **kwargs)
    model.eval()
    track_model(model)
    if qconfig is not None or found.pre_quantized:
        check_quantized_modules(model)
        restore_float32_routers(model, found.info.path)
    residency = None
    if device.type == "cuda" and not accelerate:
        from ..hooks.moe_dispatch import active_moe_impl

        residency = place_for_spec(model, spec, device, active_moe_impl(model))
    return model, residency


def save_quantized_copy(loaded: LoadedModel, dest: str | Path | None = None,
                        progress: ProgressFn | None = None) -> Path:
    """Write the loaded int8/nf4 model as a pre-quantized checkpoint (default: next to its folder)."""
    from ..checkpoint.prequantized import default_copy_path, save_prequantized

    target = Path(dest) if dest is not None else default_copy_path(loaded.info.path, loaded.spec.quant)
    return save_prequantized(loaded.model, loaded.info.path, target, progress=progress)
