"""Live previews in a real ComfyUI (issue 24): binary preview messages over /ws during sampling.

run_comfyui_e2e.py calls check_previews() with its main server, which runs with ComfyUI's default
``--preview-method none``. A second server on the same base directory (its own port and database)
runs with ``--preview-method auto --preview-size 256``. The same prompt (same seed) is queued on both:
  * with previews: one binary PREVIEW_IMAGE message (type 1, a JPEG) per step but the last, each
    before the Generate node's ``executed`` message, each a JPEG that fits 256 px with the image's
    aspect ratio (ComfyUI scales the preview to --preview-size);
  * without: no binary message;
  * the final images are identical (the PNGs' pixel data, IDAT, byte for byte).
Stdlib only (the runner runs under any Python).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from comfy_client import ComfyServer, WebSocket, collect_until_done

PREVIEW_SIZE = 256
PREVIEW_IMAGE = 1  # server.BinaryEventTypes.PREVIEW_IMAGE
JPEG = 1  # the image-type word of send_image


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"bad JPEG marker at {i}")
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ValueError("no JPEG frame header")


def png_idat(data: bytes) -> bytes:
    """The concatenated IDAT chunks of a PNG: its compressed pixels, without the text metadata."""
    out, i = b"", 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        if kind == b"IDAT":
            out += data[i + 8 : i + 8 + length]
        i += 12 + length
    return out


def _run(server: ComfyServer, ws: WebSocket, prompt: dict, timeout: float) -> dict[str, Any]:
    """Queue ``prompt``; its events, the binary frames that arrived meanwhile, the image's bytes."""
    before = len(ws.binary)
    status, body = server.queue(prompt, ws.client_id)
    if status != 200:
        return {"error": f"HTTP {status}: {str(body)[:300]}"}
    events = collect_until_done(ws, body["prompt_id"], timeout)
    history = server.wait_history(body["prompt_id"], 60)
    images = [img for out in history.get("outputs", {}).values() for img in out.get("images", [])]
    executed = [e["t"] for e in events if e["type"] == "executed" and str(e["data"].get("node")) == "2"]
    return {
        "end": events[-1]["type"] if events else "none",
        "frames": ws.binary[before:],
        "executed_at": executed[0] if executed else float("inf"),
        "png": server.view(images[0]) if images else b"",
    }


def check_previews(e2e: Any, comfy_dir: Path, python: str, base: Path, env: dict[str, str], prompt: dict,
                   steps: int, size: tuple[int, int]) -> None:
    """The checks above; ``prompt`` is an API workflow whose node "2" is Generate with ``steps`` steps
    rendering ``size`` (width, height)."""
    server = ComfyServer(comfy_dir, python, base, extra_args=[
        "--preview-method", "auto", "--preview-size", str(PREVIEW_SIZE),
        "--database-url", f"sqlite:///{base}/db-previews.sqlite",
    ], env=env, cpu=e2e.server.cpu)
    server.log_path = base / "comfyui-previews.log"
    ws = None
    try:
        t0 = time.monotonic()
        server.start()
        ws = WebSocket("127.0.0.1", server.port)
        on = _run(server, ws, prompt, e2e.timeout)
        off = _run(e2e.server, e2e.ws, prompt, e2e.timeout)
    finally:
        if ws is not None:
            ws.close()
        server.stop()
    problems, sizes = [], []
    for _, frame in on.get("frames", []):
        event, kind = struct.unpack(">II", frame[:8])
        if event != PREVIEW_IMAGE or kind != JPEG:
            problems.append(f"frame event {event} type {kind}")
            continue
        sizes.append(jpeg_size(frame[8:]))
    frames = on.get("frames", [])
    w, h = size
    want = (PREVIEW_SIZE, round(PREVIEW_SIZE * h / w)) if w >= h else (round(PREVIEW_SIZE * w / h), PREVIEW_SIZE)
    bad_sizes = [s for s in sizes if abs(s[0] - want[0]) > 1 or abs(s[1] - want[1]) > 1]
    late = [t for t, _ in frames if t > on.get("executed_at", 0)]
    e2e.check(
        f"previews (--preview-method auto): {steps - 1} binary JPEG previews over /ws during sampling",
        on.get("end") == "execution_success" and len(frames) == steps - 1 and not problems and not bad_sizes
        and not late,
        f"{on.get('end', on.get('error'))}; {len(frames)} binary frames for {steps} steps; JPEG sizes "
        f"{sorted(set(sizes))} (want {want}); after the node's result: {len(late)}; {'; '.join(problems[:3])} "
        f"(second server up and run in {time.monotonic() - t0:.1f} s)",
    )
    e2e.check(
        "no previews with --preview-method none (ComfyUI's default)",
        off.get("end") == "execution_success" and not off.get("frames"),
        f"{off.get('end', off.get('error'))}; {len(off.get('frames', []))} binary frames",
    )
    same = bool(on.get("png")) and png_idat(on["png"]) == png_idat(off.get("png", b""))
    e2e.check(
        "the final image is identical with and without previews",
        same,
        f"PNG pixel data (IDAT) {len(png_idat(on.get('png', b'')))} bytes, identical: {same}",
    )
