#!/usr/bin/env python3
"""End-to-end run of the pack inside a real ComfyUI server, driven over its HTTP API (opt-in).

    COMFYUI_DIR=/tmp/comfyui COMFYUI_PYTHON=/tmp/comfyui/venv/bin/python \
        python tests/e2e/run_comfyui_e2e.py [--steps 8] [--keep]

Without COMFYUI_DIR and COMFYUI_PYTHON it prints SKIPPED and exits 0. Otherwise it:
  * makes a throw-away base directory B, links this pack in as B/custom_nodes/ComfyUI-HunyuanImage3
    (a name with dashes) and writes the test checkpoint to B/models/HunyuanImage-3/HunyuanImage-3;
  * starts `main.py` on a free loopback port, with `--cpu` unless it runs on CUDA (--device), plus the
    arguments in COMFYUI_ARGS, e.g. '--front-end-root DIR' (always stopped at the end, also on failure);
  * checks /object_info for our nodes and documented inputs, and the workflows/ files against it;
  * checks the pack's frontend extension (web/, WEB_DIRECTORY) is listed by /extensions and served, and,
    where Node.js, playwright-core and Chromium are present (browser_text_check.mjs; skipped saying why
    otherwise), that after a run queued from ComfyUI's own page the Generate node shows its text on the
    canvas (a screenshot, --screenshot) and the Instruct edit workflow's nodes do not cover one another;
  * queues every workflows/*.api.json via POST /prompt, follows /ws and /history, fetches each
    image via /view and checks its size, checks 'progress' events (max = steps);
  * Instruct (issue 11): writes an Instruct test checkpoint (models/HunyuanImage-3/HunyuanImage-3-Instruct)
    and the example images into input/, runs the edit / fusion / think+recaption workflows (LoadImage ->
    Generate image_1..) and checks the model's text reaches the UI (/history outputs and the ws 'executed'
    message of the Preview Any node and of Generate), text-stage progress (tokens of max_new_tokens) before
    the step progress, and that a base checkpoint refuses reference images with no weight read (the
    loaders only check; Generate loads), after which a text-to-image run loads the model once;
  * the first Generate of a model shows the bytes read on its progress bar;
  * proves cancel (/interrupt), ComfyUI's own unload (/free; server RSS before/after), bad input
    (missing model folder, steps=0) and repeated queueing (the model loads once);
  * security (issue 15, docs/security.md): uploads a copy of the checkpoint whose remote code writes a
    marker file through POST /upload/image into input/<subfolder>, queues INT8 loader prompts naming
    it by '../../input/<subfolder>', by its absolute path and through a symlink in the model folder,
    and checks each is refused and the marker never appears; a folder named in an
    --extra-model-paths-config yaml is listed, a hidden one is not;
  * on CUDA only (cuda_oom_check.py): a second process fills the GPU, a queued prompt hits a real
    CUDA out-of-memory inside the server (execution_error, server up), and the next prompt succeeds;
  * live previews (issue 24, preview_check.py): a second server with --preview-method auto sends binary
    JPEG previews over /ws while Generate samples (counted, sizes checked); the main server (ComfyUI's
    default, none) sends none; the final image is identical with and without;
  * prints a summary table and exits 1 if any check failed.
Stdlib only: runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from comfy_client import ComfyServer, WebSocket, collect_until_done, once_at_progress, png_size  # noqa: E402
from cuda_oom_check import check_cuda_oom  # noqa: E402
from preview_check import check_previews  # noqa: E402
from workflow_check import check_api, check_ui  # noqa: E402

PACK_DIR_NAME = "ComfyUI-HunyuanImage3"
MODEL_NAME = "HunyuanImage-3"
INSTRUCT_MODEL_NAME = "HunyuanImage-3-Instruct"
TEXT_TOKENS = 6  # max_new_tokens of the queued think / recaption runs (random weights: the text runs to it)
GENERATE_ID = "2"
LOADER_ID = "1"
LOAD_LINE = re.compile(r"loaded .+ in [\d.]+ s")  # hunyuan_loader.load.pipeline logs one per load from disk
# The first Generate of a model loads it and reports bytes read on its progress bar (the test checkpoint:
# ~2 MB); steps and text tokens count far less.
LOAD_PROGRESS_MIN = 1 << 20
EXTENSION = "/extensions/ComfyUI-HunyuanImage3/hunyuan_image3_text.js"  # the pack's WEB_DIRECTORY script
DROP_LINE = "ComfyUI asked to unload models: dropping the cached HunyuanImage-3 model"
EXTRA_ROOT = "extra_models/hy3"  # under the base directory, registered through an extra_model_paths yaml
EXTRA_NAME = "Listed-Through-Extra-Model-Paths"
UPLOAD_SUBFOLDER = "hy3-upload"
MARKER = "REMOTE_CODE_RAN.txt"  # under the base directory; written by the uploaded checkpoint's code

DOCUMENTED = {  # class: (required inputs, optional inputs, outputs)
    "HunyuanImage3LoaderINT8": (["model_name", "offload_mode"], [], ["HUNYUAN_IMAGE3"]),
    "HunyuanImage3LoaderNF4": (["model_name", "offload_mode"], [], ["HUNYUAN_IMAGE3"]),
    "HunyuanImage3LoaderBF16": (["model_name", "offload_mode"], [], ["HUNYUAN_IMAGE3"]),
    "HunyuanImage3LoaderBudget": (
        ["model_name", "quantization", "vram_budget_gb", "inference_headroom_gb"],
        [],
        ["HUNYUAN_IMAGE3"],
    ),
    "HunyuanImage3Generate": (
        ["model", "prompt", "seed", "steps", "guidance_scale", "resolution", "width", "height"],
        ["use_checkpoint_defaults", "image_1", "image_2", "image_3", "bot_task", "max_new_tokens",
         "infer_align_image_size"],
        ["IMAGE", "STRING"],
    ),
    "HunyuanImage3ForceUnload": (["nuke_orphaned_tensors"], ["trigger"], ["*", "STRING"]),
    "HunyuanImage3SoftUnload": (["model"], ["trigger"], ["HUNYUAN_IMAGE3", "*"]),
}


@dataclass
class Run:
    label: str
    status: int = 0
    prompt_id: str = ""
    body: object = None
    events: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    loads: int = 0  # model loads from disk during this run (server log)

    @property
    def end(self) -> str:
        ends = [
            e["type"]
            for e in self.events
            if e["type"].startswith("execution_") and e["type"] not in ("execution_start", "execution_cached")
        ]
        return ends[-1] if ends else ("rejected" if self.status != 200 else "none")

    def executed_text(self, node: str) -> list[str] | None:
        """The ui text of a node's ws 'executed' message (None if it sent none)."""
        for e in self.events:
            if e["type"] == "executed" and str(e["data"].get("node")) == node:
                return list((e["data"].get("output") or {}).get("text") or [])
        return None

    def progress(self, node: str = GENERATE_ID, load: bool = False) -> list[tuple[int, int]]:
        """The node's progress events: text tokens and steps, or (``load``) the bytes of a load."""
        return [
            (e["data"]["value"], e["data"]["max"])
            for e in self.events
            if e["type"] == "progress" and str(e["data"].get("node")) == node
            and (e["data"]["max"] >= LOAD_PROGRESS_MIN) == load
        ]

    def cached(self) -> list[str]:
        return [
            str(n) for e in self.events if e["type"] == "execution_cached" for n in e["data"].get("nodes", [])
        ]

    def error(self) -> dict:
        for e in self.events:
            if e["type"] == "execution_error":
                return e["data"]
        return {}

    def images(self) -> list[dict]:
        return [img for out in self.history.get("outputs", {}).values() for img in out.get("images", [])]


class E2E:
    def __init__(self, server: ComfyServer, ws: WebSocket, steps: int | None, timeout: float) -> None:
        self.server, self.ws, self.steps, self.timeout = server, ws, steps, timeout
        self.results: list[tuple[str, bool, str]] = []
        self.runs: list[Run] = []
        self.marker_seen: list[str] = []  # model_names whose prompt wrote the security marker
        self.seed = 1000

    # -- bookkeeping --------------------------------------------------------------
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        detail = " ".join(str(detail).split())
        self.results.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return bool(ok)

    def load_count(self) -> int:
        return len(LOAD_LINE.findall(self.server.log_text()))

    def workflow(self, name: str, **generate_inputs) -> dict:
        prompt = json.loads((PACK_ROOT / "workflows" / f"{name}.api.json").read_text())
        gen = prompt[GENERATE_ID]["inputs"]
        if self.steps is not None:
            gen["steps"] = self.steps
        self.seed += 1
        gen["seed"] = self.seed
        if gen.get("bot_task", "image") != "image":
            gen["max_new_tokens"] = TEXT_TOKENS
        gen.update(generate_inputs)
        return prompt

    def run(self, label: str, prompt: dict, on_event=None) -> Run:
        run = Run(label)
        loads_before = self.load_count()
        t0 = time.monotonic()
        run.status, run.body = self.server.queue(prompt, self.ws.client_id)
        if run.status != 200:
            run.seconds = time.monotonic() - t0
            self.runs.append(run)
            return run
        run.prompt_id = run.body["prompt_id"]
        run.events = collect_until_done(self.ws, run.prompt_id, self.timeout, on_event)
        run.seconds = time.monotonic() - t0
        run.history = self.server.wait_history(run.prompt_id, 60)
        time.sleep(0.2)  # let the log catch up
        run.loads = self.load_count() - loads_before
        self.runs.append(run)
        return run

    def good_run(
        self, label: str, prompt: dict, size: tuple[int, int] | None = (1024, 1024)
    ) -> tuple[bool, Run, str]:
        run = self.run(label, prompt)
        node_errors = run.body.get("node_errors") if isinstance(run.body, dict) else None
        if node_errors:  # 200 but some outputs were dropped ("Output will be ignored")
            return False, run, f"node_errors on POST /prompt: {json.dumps(node_errors)[:300]}"
        if run.end != "execution_success":
            err = run.error()
            return (
                False,
                run,
                f"{run.end} {run.status} {err.get('exception_type', '')}: "
                f"{str(err.get('exception_message', run.body))[:300]}",
            )
        images = run.images()
        if not images:
            return False, run, "no image in /history outputs"
        sizes = [png_size(self.server.view(img)) for img in images]
        if size is not None and any(s != size for s in sizes):
            return False, run, f"image sizes {sizes}, expected {size}"
        shown = "/".join(f"{w}x{h}" for w, h in sizes)
        return True, run, f"{len(images)} image(s) {shown} via /view in {run.seconds:.1f} s"

    # -- checks -------------------------------------------------------------------
    def check_extension(self) -> None:
        """The pack's WEB_DIRECTORY script is listed by GET /extensions and served."""
        listed = self.server.get_json("/extensions")
        script = self.server.get_bytes(EXTENSION).decode("utf-8", "replace") if EXTENSION in listed else ""
        self.check(
            "frontend extension listed by /extensions and served",
            "registerExtension" in script and "HunyuanImage3Generate" in script,
            f"{EXTENSION} {'listed' if EXTENSION in listed else 'NOT listed'}, {len(script)} characters served",
        )

    def check_browser(self, base: Path, screenshot: Path | None) -> None:
        """In headless Chromium: after a run queued from ComfyUI's own page, the Generate node shows its text
        on the canvas (the pack's extension); the Instruct edit workflow laid out by the frontend has no node
        covering another. Skipped, saying why, without Node.js, playwright-core or Chromium."""
        chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
        node = shutil.which("node")
        pw = os.environ.get("PLAYWRIGHT_CORE", "")
        if node and not pw:
            found = subprocess.run([node, "-e", "console.log(require.resolve('playwright-core'))"],
                                   capture_output=True, text=True, cwd=HERE)
            pw = str(Path(found.stdout.strip()).parent) if found.returncode == 0 else ""
        missing = [what for what, have in (("node", node), ("playwright-core (PLAYWRIGHT_CORE)", pw),
                                           (f"Chromium ({chromium})", Path(chromium).is_file())) if not have]
        if missing:
            print(f"SKIPPED browser check: {', '.join(missing)} not found (Debian chromium, "
                  "`npm install playwright-core`, PLAYWRIGHT_CORE=<its folder>)", flush=True)
            return
        shot = screenshot or base / "browser_generate_text.png"
        out = base / "browser_result.json"
        steps = str(self.steps or 3)
        res = subprocess.run(
            [node, str(HERE / "browser_text_check.mjs"), self.server.url,
             str(PACK_ROOT / "workflows" / "hunyuan_image3_bf16.json"),
             str(PACK_ROOT / "workflows" / "hunyuan_image3_instruct_edit.json"), str(shot), str(out), steps],
            capture_output=True, text=True, timeout=self.timeout + 300, env=dict(os.environ, PLAYWRIGHT_CORE=pw),
        )
        result = json.loads(out.read_text()) if out.is_file() else {"errors": [res.stderr[-500:]]}
        text = (result.get("generate") or {}).get("text", "")
        self.check(
            "browser: after a run the Generate node shows its text on the canvas",
            not result["errors"] and text.startswith(f"1024x1024, {steps} steps") and shot.is_file(),
            f"text {text!r:.120}; errors {result['errors'][:2]}; screenshot {shot}",
        )
        boxes = result.get("layout") or []
        overlaps = [f"{a['title']} / {b['title']}" for i, a in enumerate(boxes) for b in boxes[i + 1:]
                    if a["box"][0] < b["box"][0] + b["box"][2] and b["box"][0] < a["box"][0] + a["box"][2]
                    and a["box"][1] < b["box"][1] + b["box"][3] and b["box"][1] < a["box"][1] + a["box"][3]]
        self.check(
            "browser: the Instruct edit workflow's nodes do not cover one another",
            bool(boxes) and not overlaps,
            "; ".join(overlaps) or f"{len(boxes)} node boxes as the frontend laid them out",
        )

    def check_object_info(self) -> dict:
        info = self.server.get_json("/object_info")
        log = self.server.log_text()
        import_failed = [
            ln
            for ln in log.splitlines()
            if PACK_DIR_NAME in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)
        ]
        missing = [c for c in DOCUMENTED if c not in info]
        self.check(
            "pack imported as custom_nodes/" + PACK_DIR_NAME,
            not missing and not import_failed,
            f"{len(DOCUMENTED) - len(missing)}/{len(DOCUMENTED)} nodes listed"
            + (f"; missing {missing}" if missing else "")
            + (f"; {import_failed[0]}" if import_failed else ""),
        )
        problems = []
        for cls, (req, opt, outs) in DOCUMENTED.items():
            if cls not in info:
                continue
            node = info[cls]
            have_req, have_opt = node["input"].get("required", {}), node["input"].get("optional", {})
            problems += [f"{cls}.{n} not required" for n in req if n not in have_req]
            problems += [f"{cls}.{n} not optional" for n in opt if n not in have_opt]
            if node["output"] != outs:
                problems.append(f"{cls} outputs {node['output']} != {outs}")
            if node.get("category") != "HunyuanImage3":
                problems.append(f"{cls} category {node.get('category')}")
        gen = info.get("HunyuanImage3Generate", {}).get("input", {}).get("required", {})
        if gen:
            if gen["steps"][1].get("min") != 1:
                problems.append(f"Generate.steps min {gen['steps'][1].get('min')}")
            res = gen["resolution"][0]
            if not ({"auto", "1024x1024", "custom"} <= set(res)):
                problems.append(f"resolution choices {res[:5]}...")
        for cls in ("HunyuanImage3LoaderBF16", "HunyuanImage3LoaderBudget"):
            if cls in info and MODEL_NAME not in info[cls]["input"]["required"]["model_name"][0]:
                problems.append(f"{cls}.model_name does not list the test checkpoint {MODEL_NAME}")
        if "HunyuanImage3ForceUnload" in info and not info["HunyuanImage3ForceUnload"].get("output_node"):
            problems.append("ForceUnload is not an output node")
        self.check(
            "/object_info lists documented inputs/outputs",
            not problems,
            "; ".join(problems)
            if problems
            else "7 nodes, category HunyuanImage3, steps min 1, model combo ok, Generate -> IMAGE + STRING",
        )
        return info

    def check_workflow_files(self, info: dict) -> list[str]:
        names = sorted(p.name[: -len(".api.json")] for p in (PACK_ROOT / "workflows").glob("*.api.json"))
        problems = []
        for name in names:
            ui_path = PACK_ROOT / "workflows" / f"{name}.json"
            if not ui_path.is_file():
                problems.append(f"{name}: no UI-format file")
            else:
                problems += [f"{name}.json: {e}" for e in check_ui(json.loads(ui_path.read_text()), info)]
            api = json.loads((PACK_ROOT / "workflows" / f"{name}.api.json").read_text())
            problems += [f"{name}.api.json: {e}" for e in check_api(api, info)]
        self.check(
            "workflows/ valid against /object_info (UI + API)",
            names and not problems,
            "; ".join(problems[:6]) if problems else f"{len(names)} workflows x 2 formats",
        )
        return names

    def check_workflows(self, names: list[str]) -> None:
        progress_problems, load_problems = [], []
        for name in names:
            prompt = self.workflow(name)
            gen = prompt[GENERATE_ID]["inputs"]
            steps = gen["steps"]
            res = gen.get("resolution", "1024x1024")
            size = tuple(int(v) for v in res.split("x")) if "x" in res else None  # auto: the model picks
            ok, run, detail = self.good_run(f"workflow {name}", prompt, size)
            self.check(f"queue workflows/{name}.api.json", ok, detail + f" (loads from disk: {run.loads})")
            prog = run.progress()
            loading = run.progress(load=True)
            if bool(loading) != bool(run.loads) or (loading and loading[-1][0] != loading[-1][1]):
                load_problems.append(f"{name}: loads {run.loads}, load progress {loading[:2]}...{loading[-1:]}")
            text_task = gen.get("bot_task", "image") != "image"
            text_prog = [p for p in prog if text_task and p[1] == gen.get("max_new_tokens")]
            step_prog = prog[len(text_prog):]
            if not step_prog or any(m != steps for _, m in step_prog) or step_prog[-1][0] != steps:
                progress_problems.append(f"{name}: {prog[:3]}...{prog[-2:]} (steps {steps})")
            if text_task and [v for v, _ in text_prog] != list(range(1, len(text_prog) + 1)):
                progress_problems.append(f"{name}: text progress {text_prog} (max_new_tokens {gen['max_new_tokens']})")
            kinds = {k: v["class_type"] for k, v in prompt.items()}
            if "HunyuanImage3ForceUnload" in kinds.values() and ok:
                text = run.history.get("outputs", {}).get("4", {}).get("text", [])
                self.check("Force Unload report in /history", bool(text), (text[0] if text else "none")[:160])
            if "PreviewAny" in kinds.values() and ok:
                self.check_model_text(name, run, prompt, text_task)
        self.check(
            "progress over /ws (max = steps, last = steps)",
            not progress_problems,
            "; ".join(progress_problems)
            if progress_problems
            else f"{len(names)} runs, e.g. {self.runs[-1].progress()[:2]}...{self.runs[-1].progress()[-1:]}",
        )
        loaded = [r.progress(load=True)[-1] for r in self.runs[-len(names):] if r.progress(load=True)]
        self.check(
            "a loading Generate shows the bytes read on its progress bar (the loaders only check)",
            not load_problems and bool(loaded),
            "; ".join(load_problems) if load_problems
            else f"{len(loaded)} of {len(names)} runs loaded, each to {loaded[0][1] if loaded else 0} bytes",
        )

    def check_model_text(self, name: str, run: Run, prompt: dict, text_task: bool) -> None:
        """The Generate node's STRING output reaches the UI: Preview Any's text (fed by it) in /history
        and in its ws 'executed' message, and Generate's own ui text carries it."""
        preview = next(k for k, v in prompt.items() if v["class_type"] == "PreviewAny")
        outputs = run.history.get("outputs", {})
        shown = outputs.get(preview, {}).get("text", [])
        ws_shown = run.executed_text(preview)
        node_text = outputs.get(GENERATE_ID, {}).get("text", [])
        value = shown[0] if shown else None
        if text_task:
            task = prompt[GENERATE_ID]["inputs"]["bot_task"]
            start = "<think>" if task.startswith("think") else "<recaption>"
            ok = (value is not None and value.startswith(start) and ws_shown == shown
                  and f"model text: {value}" in node_text and "text " in node_text[0])
        else:
            ok = value == "" and ws_shown == [""] and not any(t.startswith("model text") for t in node_text)
        self.check(
            f"{name}: the model's text reaches the UI (Preview Any /history + ws, Generate's text)",
            ok,
            f"preview {value!r:.80}; ws {ws_shown!r:.40}; generate {node_text!r:.160}",
        )

    def check_base_refuses_images(self) -> None:
        """A base checkpoint with a reference image, nothing loaded: refused with the message naming the fix
        and NO weight read (the loader only checks; Generate refuses before the load). Then a text-to-image
        run of the same loader loads the model, once."""
        self.server.free()  # start with nothing loaded
        self.wait_for_log(DROP_LINE, 30, min_count=self.server.log_text().count(DROP_LINE))
        prompt = self.workflow("hunyuan_image3_instruct_edit")
        prompt[LOADER_ID]["inputs"]["model_name"] = MODEL_NAME
        run = self.run("base checkpoint + reference image", prompt)
        err = run.error()
        message = str(err.get("exception_message", ""))
        self.check(
            "base checkpoint + reference image -> clear error, no weight read (server log: no load)",
            run.end == "execution_error" and "take no reference images" in message and run.loads == 0
            and err.get("node_id") == GENERATE_ID and not run.progress(load=True),
            f"{run.end} at node {err.get('node_id')}: {err.get('exception_type', '')}: {message[:160]} "
            f"(loads from disk: {run.loads})",
        )
        same_loader = self.workflow("hunyuan_image3_int8")  # the INT8 loader of the edit workflow, base model
        ok, t2i, detail = self.good_run("base text-to-image after the refusal", same_loader)
        self.check(
            "then a text-to-image run of that loader loads the model once",
            ok and t2i.loads == 1 and bool(t2i.progress(load=True)),
            detail + f"; loads from disk {t2i.loads}",
        )

    def check_repeated(self, name: str, count: int = 5) -> None:
        # Start from a dropped model, so run 1 loads and runs 2..5 must not.
        self.server.free()
        self.wait_for_log(DROP_LINE, 30, min_count=self.server.log_text().count(DROP_LINE))
        runs, oks = [], []
        for i in range(count):
            ok, run, detail = self.good_run(f"repeat {i + 1}/{count}", self.workflow(name))
            runs.append(run)
            oks.append(ok)
        loads = [r.loads for r in runs]
        times = ", ".join(f"{r.seconds:.1f}" for r in runs)
        self.check(
            f"repeated queueing x{count} (new seeds)",
            all(oks) and loads[0] == 1 and sum(loads[1:]) == 0,
            f"loads per run {loads}, times [{times}] s",
        )

    def wait_for_log(self, text: str, timeout: float, min_count: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.log_text().count(text) > min_count:
                return True
            time.sleep(0.25)
        return False

    def check_cancel(self, name: str, long_steps: int) -> None:
        # make sure the model is loaded first, so the long run spends its time in steps
        self.good_run("warm-up", self.workflow(name))
        on_event, sent = once_at_progress(GENERATE_ID, 2, self.server.interrupt)
        run = self.run("cancel (interrupted)", self.workflow(name, steps=long_steps), on_event)
        prog = run.progress()
        last = prog[-1][0] if prog else 0
        after = (run.events[-1]["t"] - sent["t"]) if sent else float("nan")
        ok = run.end == "execution_interrupted" and sent and last <= sent["value"] + 1 and last < long_steps
        self.check(
            "cancel: /interrupt ends the run within one step",
            ok,
            f"end={run.end}, interrupt at step {sent.get('value')}, last progress {last}/{long_steps}, "
            f"ended {after:.2f} s after /interrupt",
        )
        ok2, run2, detail = self.good_run("after cancel", self.workflow(name))
        self.check(
            "cancel: next prompt succeeds on the still-loaded model",
            ok2 and run2.loads == 0,
            detail + f"; loads from disk {run2.loads}; loader cached: {LOADER_ID in run2.cached()}",
        )

    def check_text_cancel(self, name: str = "hunyuan_image3_instruct_think", tokens: int = 400) -> None:
        """/interrupt during the think / recaption text: the run ends within one token, no diffusion
        step runs, and the next prompt works on the still-loaded model."""
        self.good_run("text warm-up", self.workflow(name))
        on_event, sent = once_at_progress(GENERATE_ID, 3, self.server.interrupt, total=tokens)
        run = self.run("text cancel (interrupted)", self.workflow(name, max_new_tokens=tokens, steps=3), on_event)
        prog = run.progress()
        text = [v for v, m in prog if m == tokens]
        steps = [v for v, m in prog if m != tokens]
        last = text[-1] if text else 0
        after = (run.events[-1]["t"] - sent["t"]) if sent else float("nan")
        ok = (run.end == "execution_interrupted" and sent and last <= sent["value"] + 1 and last < tokens
              and not steps)
        self.check(
            "text cancel: /interrupt ends the think text within one token",
            ok,
            f"end={run.end}, interrupt at token {sent.get('value')}, last text progress {last}/{tokens}, "
            f"diffusion steps run {len(steps)}, ended {after:.2f} s after /interrupt",
        )
        ok2, run2, detail = self.good_run("after text cancel", self.workflow(name))
        self.check(
            "text cancel: next prompt succeeds on the still-loaded model",
            ok2 and run2.loads == 0,
            detail + f"; loads from disk {run2.loads}",
        )

    def check_free(self, name: str) -> None:
        ok0, _, _ = self.good_run("before /free", self.workflow(name))  # model loaded and used
        time.sleep(1.0)
        rss_before = self.server.rss()
        drops = self.server.log_text().count(DROP_LINE)
        status = self.server.free()
        dropped = self.wait_for_log(DROP_LINE, 30, min_count=drops)
        time.sleep(2.0)  # ComfyUI gc.collect()s after unload
        rss_after = self.server.rss()
        self.check(
            "/free {unload_models, free_memory} drops our cached model",
            ok0 and status == 200 and dropped,
            f"HTTP {status}; pack log '{DROP_LINE[:40]}...' seen: {dropped}; server RSS "
            f"{rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB "
            f"({(rss_after - rss_before) / 2**20:+.0f} MiB)",
        )
        ok, run, detail = self.good_run("after /free", self.workflow(name))
        self.check(
            "after /free the next prompt reloads and succeeds",
            ok and run.loads == 1,
            detail + f"; loads from disk {run.loads}",
        )

    def check_bad_input(self, name: str) -> None:
        missing = "no-such-model-folder"
        prompt = self.workflow(name)
        prompt[LOADER_ID]["inputs"]["model_name"] = missing
        run = self.run("missing model folder", prompt)
        body = run.body if isinstance(run.body, dict) else {}
        errs = body.get("node_errors", {}).get(LOADER_ID, {}).get("errors", [])
        msg = " ".join(str(e.get("details", "")) for e in errs)
        self.check(
            "missing model folder -> 400 validation error naming it and where models go",
            run.status == 400 and missing in msg and "models/HunyuanImage-3" in msg,
            f"HTTP {run.status}, {[e.get('type') for e in errs]}: {msg[:220]}",
        )
        ok, _, detail = self.good_run("after missing model", self.workflow(name))
        self.check("next good prompt after the missing-model 400 succeeds", ok, detail)

        run = self.run("steps=0", self.workflow(name, steps=0))
        body = run.body if isinstance(run.body, dict) else {}
        errs = body.get("node_errors", {}).get(GENERATE_ID, {}).get("errors", [])
        types = [(e.get("type"), e.get("extra_info", {}).get("input_name")) for e in errs]
        self.check(
            "steps=0 -> 400 validation error",
            run.status == 400 and ("value_smaller_than_min", "steps") in types,
            f"HTTP {run.status}, {body.get('error', {}).get('type')}, {types}",
        )
        ok, _, detail = self.good_run("after steps=0", self.workflow(name))
        self.check("next good prompt after the 400 succeeds", ok, detail)

    def model_names(self, cls: str = "HunyuanImage3LoaderINT8") -> list[str]:
        info = self.server.get_json(f"/object_info/{cls}")
        return list(info[cls]["input"]["required"]["model_name"][0])

    def refused(self, label: str, model_name: str) -> tuple[bool, str]:
        """Queue the INT8 workflow with this model_name.

        Refused = HTTP 400 naming model_name, or an execution_error raised by our path rule
        (InputError / CheckpointError), not some later failure of the checkpoint itself.
        """
        prompt = self.workflow("hunyuan_image3_int8")
        prompt[LOADER_ID]["inputs"]["model_name"] = model_name
        run = self.run(label, prompt)
        if run.status == 400:
            body = run.body if isinstance(run.body, dict) else {}
            errs = body.get("node_errors", {}).get(LOADER_ID, {}).get("errors", [])
            mine = [e for e in errs if e.get("extra_info", {}).get("input_name") == "model_name"]
            text = " ".join(f"{e.get('type')}: {e.get('details', '')}" for e in mine)
            return bool(mine), f"HTTP 400 {text}"
        err = run.error()
        ours = str(err.get("exception_type", "")).endswith(("InputError", "CheckpointError"))
        return run.end == "execution_error" and ours, (
            f"{run.end}: {err.get('exception_type', '')}: {str(err.get('exception_message', ''))[:200]}"
        )

    def check_security(self, model_dir: Path, base: Path) -> None:
        marker = base / MARKER
        # 1. a checkpoint whose code writes the marker, uploaded through ComfyUI's own endpoint
        hook = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        statuses = []
        for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
            data = f.read_bytes()
            if f.name == "configuration_hunyuan.py":  # imported first (auto_map AutoConfig)
                data = data + b"\n" + hook.encode()  # appended: the file starts with __future__ imports
            statuses.append(self.server.upload(f.name, data, UPLOAD_SUBFOLDER)[0])
        uploaded = base / "input" / UPLOAD_SUBFOLDER
        self.check(
            "upload: a checkpoint with marker-writing code lands in input/" + UPLOAD_SUBFOLDER,
            set(statuses) == {200} and (uploaded / "config.json").is_file()
            and hook in (uploaded / "configuration_hunyuan.py").read_text(),
            f"{len(statuses)} files via POST /upload/image, HTTP {sorted(set(statuses))}",
        )
        # 2. folders in the model roots that must not be offered: hidden, a link out of the root
        root = model_dir.parent
        hidden = root / ".hidden-checkpoint"
        shutil.copytree(uploaded, hidden, dirs_exist_ok=True)
        link = root / "link-to-upload"
        if not link.is_symlink():
            link.symlink_to(uploaded, target_is_directory=True)
        names = self.model_names()
        self.check(
            "model_name list: the models/HunyuanImage-3 and extra_model_paths folders, no hidden, no link out",
            MODEL_NAME in names and EXTRA_NAME in names and hidden.name not in names and link.name not in names,
            f"listed {names}",
        )
        # 3. every way of naming the uploaded folder is refused, and its code never runs
        attempts = [
            ("relative ../../input path", f"../../input/{UPLOAD_SUBFOLDER}"),
            ("absolute path", str(uploaded)),
            ("symlink in models/HunyuanImage-3 to it", link.name),
            ("hidden folder in models/HunyuanImage-3", hidden.name),
        ]
        for label, name in attempts:
            ok, detail = self.refused(f"security: {label}", name)
            time.sleep(0.5)
            ran = marker.exists()
            if ran:  # remembered for the final check; removed so each attempt is judged alone
                self.marker_seen.append(name)
                marker.unlink()
            self.check(
                f"security: INT8 loader with {label} is refused, code not run",
                ok and not ran,
                f"model_name {name!r}: {detail}; marker {'WRITTEN' if ran else 'absent'}",
            )
        # 4. a folder placed in models/HunyuanImage-3 still loads and generates (INT8 here)
        ok, run, detail = self.good_run("security: listed model after refusals", self.workflow("hunyuan_image3_int8"))
        self.check("after the refusals a listed model loads and generates (INT8)", ok, detail)

    def check_marker_never_written(self, base: Path) -> None:
        marker = base / MARKER
        seen = self.marker_seen + ([marker.name] if marker.exists() else [])
        self.check(
            "security: uploaded remote code never ran during the whole run",
            not seen,
            f"marker {marker} written after {seen}" if seen else f"marker {marker} never written",
        )

    def summary(self) -> int:
        print("\n==== runs ====")
        print(f"{'run':<44} {'end':<24} {'seconds':>8} {'loads':>5}")
        for r in self.runs:
            print(f"{r.label:<44} {r.end:<24} {r.seconds:8.2f} {r.loads:5d}")
        print("\n==== checks ====")
        width = max(len(n) for n, _, _ in self.results) if self.results else 10
        for name, ok, detail in self.results:
            print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail[:150]}")
        failed = sum(1 for _, ok, _ in self.results if not ok)
        print(f"\n{len(self.results) - failed} passed, {failed} failed")
        return 1 if failed else 0


def make_test_checkpoint(python: str, dest: Path, env: dict, variant: str = "base") -> None:
    cmd = [python, "-m", "hunyuan_loader", "make-test-model", str(dest), "--variant", variant]
    res = subprocess.run(cmd, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or not (dest / "config.json").is_file():
        raise RuntimeError(
            f"make-test-model failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        )


def cuda_available(python: str, env: dict) -> bool:
    """Whether torch in ComfyUI's Python sees a CUDA GPU."""
    code = "import torch; print(torch.cuda.is_available())"
    res = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return res.returncode == 0 and res.stdout.strip().endswith("True")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=3, help="steps for every queued workflow (default 3; 0 = as in file)"
    )
    ap.add_argument(
        "--cancel-steps", type=int, default=200, help="steps of the long run that gets interrupted"
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds per prompt")
    ap.add_argument("--keep", action="store_true", help="keep the base directory (log, outputs)")
    ap.add_argument("--port", type=int, help="default: a free loopback port")
    ap.add_argument("--screenshot", type=Path, help="where the browser check saves its screenshot")
    ap.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto",
        help="ComfyUI on the CPU (--cpu) or its GPU; auto: the GPU when CUDA is available (default)",
    )
    args = ap.parse_args(argv)

    comfy_dir, python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_dir or not python:
        print(
            "SKIPPED: ComfyUI end-to-end run needs COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON "
            "(the Python of its venv, with this pack's requirements installed); see docs/api.md."
        )
        return 0
    if not (Path(comfy_dir) / "main.py").is_file():
        print(f"FAIL: COMFYUI_DIR={comfy_dir} has no main.py")
        return 1

    # stop the server also when killed (SIGTERM) or interrupted from a background job
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    base = Path(tempfile.mkdtemp(prefix="hy3-comfy-e2e-"))
    env = dict(os.environ, HF_HOME=str(base / "hf"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["HF_MODULES_CACHE"] = str(base / "hf" / "modules")
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    model_dir = base / "models" / "HunyuanImage-3" / MODEL_NAME
    extra_root = base / EXTRA_ROOT  # a second root, as a user's extra_model_paths.yaml gives it
    (extra_root / EXTRA_NAME).mkdir(parents=True)
    (base / "extra_model_paths.yaml").write_text(f"e2e:\n    {MODEL_NAME}: {extra_root}\n")
    print(
        f"base directory {base}; pack -> custom_nodes/{PACK_DIR_NAME}; test checkpoint -> {model_dir}",
        flush=True,
    )

    gpu = args.device == "gpu" or (args.device == "auto" and cuda_available(python, env))
    print(
        "ComfyUI on " + ("the GPU (CUDA)" if gpu else "the CPU (--cpu); the CUDA OOM check is skipped"),
        flush=True,
    )
    server = ComfyServer(
        Path(comfy_dir),
        python,
        base,
        port=args.port,
        extra_args=[
            "--extra-model-paths-config",
            str(base / "extra_model_paths.yaml"),
            *shlex.split(os.environ.get("COMFYUI_ARGS", "")),
        ],
        env={k: env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_MODULES_CACHE")},
        cpu=not gpu,
    )
    ws = None
    e2e = None
    rc = 1
    try:
        make_test_checkpoint(python, model_dir, env)
        make_test_checkpoint(python, model_dir.parent / INSTRUCT_MODEL_NAME, env, "instruct")
        (base / "input").mkdir(exist_ok=True)
        images = subprocess.run(  # the Instruct workflows' LoadImage files (PIL: ComfyUI's Python has it)
            [python, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; "
             f"from build_workflows import write_example_images; write_example_images(Path({str(base / 'input')!r}))"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        if images.returncode != 0:
            raise RuntimeError(f"writing the example images failed:\n{images.stderr[-2000:]}")
        shutil.copy2(model_dir / "config.json", extra_root / EXTRA_NAME / "config.json")  # listed only
        mem = subprocess.run(
            [python, str(HERE / "comfy_memory_check.py"), str(model_dir)],
            cwd=comfy_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        mem_lines = [
            ln for ln in mem.stdout.splitlines() if ln.startswith(("partial", "large", "unload_all"))
        ]
        mem_result = (
            mem.returncode == 0 and mem.stdout.rstrip().endswith("OK"),
            " | ".join(mem_lines) or (mem.stdout + mem.stderr)[-400:],
        )
        t0 = time.monotonic()
        server.start()
        print(f"ComfyUI up on {server.url} (pid {server.pid}) in {time.monotonic() - t0:.1f} s", flush=True)
        ws = WebSocket("127.0.0.1", server.port)
        e2e = E2E(server, ws, args.steps or None, args.timeout)
        e2e.check(
            "ComfyUI free_memory/unload_all_models -> our cache (in-process, real model_management)",
            *mem_result,
        )
        info = e2e.check_object_info()
        e2e.check_extension()
        names = e2e.check_workflow_files(info)
        if all(c in info for c in DOCUMENTED):
            steps = [
                ("workflows", lambda: e2e.check_workflows(names)),
                ("browser", lambda: e2e.check_browser(base, args.screenshot)),
                ("base refuses images", e2e.check_base_refuses_images),
                ("repeated", lambda: e2e.check_repeated("hunyuan_image3_bf16")),
                ("cancel", lambda: e2e.check_cancel("hunyuan_image3_bf16", args.cancel_steps)),
                ("text cancel", e2e.check_text_cancel),
                ("free", lambda: e2e.check_free("hunyuan_image3_bf16")),
                *(
                    [("cuda oom", lambda: check_cuda_oom(e2e, python, env, "hunyuan_image3_bf16",
                                                         base / "vram_filler.log", GENERATE_ID))]
                    if gpu
                    else []
                ),
                ("previews", lambda: check_previews(
                    e2e, Path(comfy_dir), python, base, server.env,
                    e2e.workflow("hunyuan_image3_bf16", steps=4, resolution="1152x896"), 4, (1152, 896))),
                ("bad input", lambda: e2e.check_bad_input("hunyuan_image3_bf16")),
                ("security", lambda: e2e.check_security(model_dir, base)),
            ]
            for label, fn in steps:
                try:
                    fn()
                except Exception as exc:  # one broken check must not hide the others
                    traceback.print_exc()
                    e2e.check(f"{label} (crashed)", False, f"{type(exc).__name__}: {exc}"[:300])
        e2e.check_marker_never_written(base)
        rc = e2e.summary()
    except Exception:
        traceback.print_exc()
        rc = 1
    finally:
        if ws is not None:
            ws.close()
        server.stop()
        print(f"server stopped; log: {server.log_path}", flush=True)
        if rc != 0:
            print("---- server log tail ----\n" + server.log_tail(60))
        if rc == 0 and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
