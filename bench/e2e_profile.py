"""Where one image's time goes, op by op: bench/e2e.py's image again under torch.profiler (``--profile``).

Prints the ops that took the most GPU time and the most host time (self time, so nothing counts twice),
the kernel launches per decoder pass, and the host syncs (``.item()``, stream / event syncs, ``nonzero``):
a pass that launches thousands of small kernels, or waits on the GPU several times, is bound by the host,
not by the weights' reads. Asserts nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# ops that make the host wait for the device (a value read back, or an explicit sync)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


@dataclass
class OpTime:
    name: str
    ms: float
    calls: int


@dataclass
class ProfileSummary:
    """One profiled image: decoder passes, launches, syncs, and the top ops by device and by host time."""

    passes: int
    launches: int = 0
    syncs: dict[str, int] = field(default_factory=dict)
    top_device: list[OpTime] = field(default_factory=list)
    top_host: list[OpTime] = field(default_factory=list)


def _self_device_us(event: Any) -> float:
    # torch renamed the CUDA-only fields to "device"; read whichever this torch has
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def summarise(events: Iterable[Any], passes: int, rows: int = 15) -> ProfileSummary:
    """The summary of ``events`` (a profiler's key_averages) for ``passes`` decoder passes."""
    events = list(events)
    out = ProfileSummary(passes=passes)
    for e in events:
        if e.key in SYNC_OPS:
            out.syncs[e.key] = out.syncs.get(e.key, 0) + int(e.count)
        if e.key in LAUNCH_OPS:
            out.launches += int(e.count)
    by_device = sorted((e for e in events if _self_device_us(e) > 0), key=_self_device_us, reverse=True)
    out.top_device = [OpTime(e.key, _self_device_us(e) / 1e3, int(e.count)) for e in by_device[:rows]]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    out.top_host = [OpTime(e.key, e.self_cpu_time_total / 1e3, int(e.count)) for e in by_host[:rows]]
    return out


def profile_image(loaded: Any, req: Any, run_image: Any, timeline: Any, rows: int = 15) -> ProfileSummary:
    """Generate ``req`` once more under the profiler (``run_image`` / ``timeline``: bench/e2e.py's)."""
    device = timeline.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_image(loaded, req, timeline)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return summarise(prof.key_averages(), len(timeline.forward_starts), rows)


def print_profile(s: ProfileSummary) -> None:
    print(f"\n== profile: {s.passes} decoder passes (text tokens + diffusion steps)")
    if s.launches:
        print(f"kernel launches {s.launches} ({s.launches / max(s.passes, 1):.0f} per pass)")
    for name, count in sorted(s.syncs.items()):
        print(f"host sync {name:28s} {count:6d} ({count / max(s.passes, 1):.1f} per pass)")
    for title, ops in (("GPU time", s.top_device), ("host time", s.top_host)):
        if ops:
            print(f"top ops by self {title}:")
            for op in ops:
                print(f"  {op.ms:10.1f} ms  {op.calls:7d} calls  {op.name[:70]}")
