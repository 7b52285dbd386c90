"""A real CUDA out-of-memory inside the ComfyUI server, then a successful run (CUDA only).

    python tests/e2e/cuda_oom_check.py fill   # the filler alone: after a line on stdin, takes the GPU's free memory

run_comfyui_e2e.py calls check_cuda_oom() when ComfyUI runs on the GPU. With the model loaded and the
server's cached CUDA blocks handed back (POST /free with free_memory only: the model stays), it queues
a long prompt; when the prompt reports its second step, a second process (started and armed before)
takes all the GPU's free memory, as another program sharing the card would. The pack placed the run
while the memory was there, so nothing refuses it up front: the next allocation the run makes (a later
step, the VAE decode) hits CUDA's own out-of-memory. The prompt must end in an execution_error that
quotes CUDA's "out of memory" with the server still answering; then the filler exits and the same
prompt must succeed. (Filling the GPU BEFORE the prompt only shows the pack's own refusal: it plans
with the free memory and says the model does not fit.) Stdlib only at import (the runner runs under
any Python); the filler imports torch.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from comfy_client import once_at_progress

MIB = 1 << 20
GIB = 1 << 30
# torch.OutOfMemoryError's first line, which the pack quotes: "CUDA out of memory. Tried to allocate ..." or
# (torch 2.11 on an H200, seen) "Allocation on device 0 would exceed allowed memory. (out of memory)"
CUDA_OOM = ("CUDA out of memory", "CUDA error: out of memory", "(out of memory)")
COMFY_OOM_LINE = "Got an OOM, unloading all loaded models."  # ComfyUI's execution.py on torch's OOM


def fill() -> int:
    """Start CUDA, say ``ready``, wait for a line on stdin, then allocate the GPU's free memory in
    shrinking chunks; print what is left; hold until stdin closes."""
    import torch

    torch.empty(1, device="cuda")
    print("ready", flush=True)
    if not sys.stdin.readline():  # stdin closed before the signal: take nothing
        return 0
    chunks, size = [], GIB
    while size >= MIB:
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            size //= 2
    free, total = torch.cuda.mem_get_info()
    print(f"filled {sum(c.numel() for c in chunks)} free {free} total {total}", flush=True)
    sys.stdin.read()
    return 0


class VramFiller:
    """The filler as a child process of ``python`` (ComfyUI's, with torch); ends on exit."""

    def __init__(self, python: str, env: dict[str, str], log_path: Path, timeout: float = 180.0) -> None:
        self.python, self.env, self.log_path, self.timeout = python, env, log_path, timeout
        self.proc: subprocess.Popen | None = None
        self.taken = self.free = self.total = 0

    def __enter__(self) -> VramFiller:
        """Start the filler armed: CUDA up, nothing taken until ``fill_now``."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, str(Path(__file__).resolve()), "fill"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=self.env,
        )
        self._expect("ready")
        return self

    def _expect(self, word: str) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith(word):
            self.proc.kill()
            self.__exit__(None, None, None)
            raise RuntimeError(f"VRAM filler did not say {word!r} within {self.timeout:.0f} s: {line!r}; "
                               f"log {self.log_path}")
        return line

    def fill_now(self) -> None:
        """Take the GPU's free memory now; returns once it is taken."""
        if self.taken or self.proc is None:
            return
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        fields = self._expect("filled ").split()
        self.taken, self.free, self.total = int(fields[1]), int(fields[3]), int(fields[5])

    def __exit__(self, *exc: Any) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(10)
        self._log.close()

    def describe(self) -> str:
        return f"a second process took {self.taken / GIB:.1f} GiB, {self.free / MIB:.0f} MiB of {self.total / GIB:.0f} GiB left"


def check_cuda_oom(e2e: Any, python: str, env: dict[str, str], name: str, log_path: Path,
                   generate_node: str, steps: int = 200, fill_at: int = 2) -> None:
    """The e2e step (``e2e`` is run_comfyui_e2e.E2E; ``steps`` at most the node's maximum, 200): a prompt whose GPU memory is taken by another
    process at step ``fill_at`` of ``steps`` (progress of node ``generate_node``) ends in CUDA's OOM, then the same prompt succeeds."""
    ok0, _, detail0 = e2e.good_run("before CUDA OOM (model on the GPU)", e2e.workflow(name))
    if not ok0:
        e2e.check("CUDA OOM: the model runs on the GPU first", False, detail0)
        return
    status = e2e.server.free(unload_models=False, free_memory=True)  # ComfyUI's soft_empty_cache
    time.sleep(3.0)
    mark = len(e2e.server.log_text())
    with VramFiller(python, env, log_path) as filler:
        on_event, fired = once_at_progress(generate_node, fill_at, filler.fill_now)
        run = e2e.run("CUDA OOM (GPU taken by a second process during the run)",
                      e2e.workflow(name, steps=steps), on_event)
    log = e2e.server.log_text()[mark:]
    try:
        alive = bool(e2e.server.get_json("/system_stats", timeout=10))
    except Exception:  # noqa: BLE001 - any failure means the server is gone
        alive = False
    err = run.error()
    message = str(err.get("exception_message", ""))
    seen = [text for text in CUDA_OOM if text in message]
    last = max((v for v, _ in run.progress()), default=0)
    e2e.check(
        "CUDA OOM inside the server -> execution_error naming it, server still up",
        run.end == "execution_error" and bool(seen) and alive,
        f"{run.end}: {err.get('exception_type', '')}: {message.strip()[:260]}; CUDA's text in the error: {seen}; "
        f"server up: {alive}; GPU taken at step {fired.get('value')} of {steps}, last step reported {last}; "
        f"ComfyUI's own OOM handler ran: {COMFY_OOM_LINE in log}; {filler.describe()}; "
        f"/free(free_memory) HTTP {status}",
    )
    ok, run2, detail = e2e.good_run("after CUDA OOM (GPU freed)", e2e.workflow(name))
    e2e.check("after the CUDA OOM the next prompt succeeds", ok, detail + f"; loads from disk {run2.loads}")


if __name__ == "__main__":
    if sys.argv[1:] != ["fill"]:
        sys.exit(__doc__)
    sys.exit(fill())
