"""A small, stdlib-only client for a real ComfyUI server: start/stop, HTTP, /ws, images.

Used by run_comfyui_e2e.py. Stdlib only (urllib, socket), so it runs under any Python:
the project's venv, ComfyUI's venv, or a bare system Python.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def process_rss(pid: int) -> int:
    """Resident set size of a process in bytes (psutil when present, else /proc)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RSS for pid {pid}")


def _send(req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
    """(HTTP status, JSON body or raw bytes) of one request; an HTTP error status is a result too."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


class ComfyServer:
    """A ComfyUI server process on a loopback port with its own base directory."""

    def __init__(
        self,
        comfy_dir: Path,
        python: str,
        base_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        cpu: bool = True,
    ) -> None:
        """``cpu``: start with ``--cpu``; False lets ComfyUI use its GPU (CUDA)."""
        self.comfy_dir = Path(comfy_dir)
        self.python = python
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.env = env or {}
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_fh = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            f"sqlite:///{self.base_dir}/db.sqlite",
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(self.env)
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfy_dir,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.proc.returncode} during start; log: {self.log_path}\n"
                    + self.log_tail()
                )
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        raise RuntimeError(
            f"ComfyUI did not answer within {timeout:.0f} s; log: {self.log_path}\n" + self.log_tail()
        )

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGTERM, then SIGKILL) - safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 3), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return process_rss(self.pid)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # HTTP -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        return _send(req, timeout)

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {data!r}")
        return data

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read()

    def queue(self, prompt: dict, client_id: str) -> tuple[int, Any]:
        """POST /prompt; returns (status, body) - 200 with prompt_id, or 400 with node_errors."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def wait_history(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("ComfyUI died while running a prompt:\n" + self.log_tail())
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {
                "filename": image["filename"],
                "subfolder": image.get("subfolder", ""),
                "type": image.get("type", "output"),
            }
        )
        return self.get_bytes(f"/view?{query}")

    def upload(
        self, filename: str, data: bytes, subfolder: str = "", kind: str = "input", timeout: float = 60.0
    ) -> tuple[int, Any]:
        """POST /upload/image (multipart, overwrite): ComfyUI stores any file name in <kind>/<subfolder>."""
        boundary = uuid.uuid4().hex
        fields = {"subfolder": subfolder, "type": kind, "overwrite": "true"}
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(
            self.url + "/upload/image",
            data=body,
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        return _send(req, timeout)

    def interrupt(self) -> int:
        return self.request("POST", "/interrupt", {})[0]

    def free(self, unload_models: bool = True, free_memory: bool = True) -> int:
        return self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})[0]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


class WebSocket:
    """Minimal RFC 6455 client for ComfyUI's /ws: text frames as JSON; binary frames (previews) are kept
    in ``binary`` as (monotonic time, payload), never returned by ``recv``."""

    def __init__(self, host: str, port: int, client_id: str | None = None, timeout: float = 30.0) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        self.binary: list[tuple[float, bytes]] = []
        header, self._buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake failed: {header[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next JSON message, or None on timeout."""
        self.sock.settimeout(timeout)
        message, opcode = b"", None
        try:
            while True:
                b0, b1 = self._read(2)
                op, fin = b0 & 0x0F, b0 & 0x80
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if op == 0x9:  # ping
                    self._send(0xA, payload)
                    continue
                if op == 0x8:
                    raise ConnectionError("websocket closed by server")
                if op in (0x1, 0x2):
                    opcode, message = op, payload
                elif op == 0x0:
                    message += payload
                if fin and opcode is not None:
                    if opcode == 0x1:
                        return json.loads(message.decode())
                    self.binary.append((time.monotonic(), bytes(message)))  # a preview: kept aside
                    message, opcode = b"", None
        except TimeoutError:
            return None

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


def once_at_progress(node: str, at: int, action: Any, total: int | None = None) -> tuple[Any, dict]:
    """An ``on_event`` for ``collect_until_done`` that calls ``action()`` once, at the first progress
    event of ``node`` whose value is at least ``at`` (and whose max is ``total``, when given).
    Returns it and a dict that gets the event's ``value`` and the time ``t`` (just before the action)."""
    fired: dict = {}

    def on_event(msg: dict) -> None:
        d = msg.get("data") or {}
        if (not fired and msg.get("type") == "progress" and str(d.get("node")) == node
                and (total is None or d.get("max") == total) and int(d.get("value", 0)) >= at):
            fired["value"], fired["t"] = int(d["value"]), time.monotonic()
            action()

    return on_event, fired


def collect_until_done(ws: WebSocket, prompt_id: str, timeout: float = 600.0, on_event=None) -> list[dict]:
    """WS messages for one prompt until execution_success / _error / _interrupted (or timeout)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        if msg is None:
            continue
        data = msg.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        msg["t"] = time.monotonic()
        events.append(msg)
        if on_event is not None:
            on_event(msg)
        if (
            msg.get("type") in ("execution_success", "execution_error", "execution_interrupted")
            and data.get("prompt_id") == prompt_id
        ):
            return events
        if msg.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return events  # older servers: "executing" with node None ends the prompt
    raise TimeoutError(f"no end event for prompt {prompt_id} after {timeout:.0f} s")


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
