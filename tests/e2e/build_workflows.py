"""Writes the example workflows in workflows/ (UI format *.json and API format *.api.json).

    python tests/e2e/build_workflows.py      # from the pack root; rewrites workflows/

One description per workflow, two renderings, so both formats always say the same thing.
Widget order follows the nodes' INPUT_TYPES (required, then optional); the UI format adds the
frontend's control_after_generate value after `seed`. run_comfyui_e2e.py checks both formats
against the live server's /object_info.
"""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
MODEL_NAME = "HunyuanImage-3"  # ComfyUI/models/HunyuanImage-3/HunyuanImage-3, as the README says
PROMPT = "a red fox in fresh snow, morning light, photograph"

LOADERS = {
    # file stem: (class, title, [(widget, value)...])
    "hunyuan_image3_int8": (
        "HunyuanImage3LoaderINT8",
        "HunyuanImage-3 Loader (INT8)",
        [("model_name", MODEL_NAME), ("offload_mode", "disabled"), ("moe_impl", "gather_scatter")],
    ),
    "hunyuan_image3_nf4": (
        "HunyuanImage3LoaderNF4",
        "HunyuanImage-3 Loader (NF4)",
        [("model_name", MODEL_NAME), ("offload_mode", "disabled"), ("moe_impl", "gather_scatter")],
    ),
    "hunyuan_image3_bf16": (
        "HunyuanImage3LoaderBF16",
        "HunyuanImage-3 Loader (BF16)",
        [("model_name", MODEL_NAME), ("offload_mode", "smart"), ("moe_impl", "gather_scatter")],
    ),
    "hunyuan_image3_budget": (
        "HunyuanImage3LoaderBudget",
        "HunyuanImage-3 Loader (VRAM budget)",
        [
            ("model_name", MODEL_NAME),
            ("quantization", "bf16"),
            ("vram_budget_gb", 80.0),
            ("inference_headroom_gb", 0.0),
            ("moe_impl", "gather_scatter"),
        ],
    ),
}

GENERATE = [
    ("prompt", PROMPT),
    ("seed", 42),
    ("steps", 50),
    ("guidance_scale", 5.0),
    ("resolution", "1024x1024"),
    ("width", 1024),
    ("height", 1024),
    ("use_checkpoint_defaults", False),
]


def _ui_node(node_id, type_, title, pos, widgets, inputs=(), outputs=(), order=0, size=(320, 130)):
    values = []
    for name, value in widgets:
        values.append(value)
        if name == "seed":
            values.append("fixed")  # control_after_generate
    return {
        "id": node_id,
        "type": type_,
        "pos": list(pos),
        "size": list(size),
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": [dict(i) for i in inputs],
        "outputs": [dict(o) for o in outputs],
        "title": title,
        "properties": {"Node name for S&R": type_},
        "widgets_values": values,
    }


def build(stem: str, force_unload: bool = False) -> tuple[dict, dict]:
    loader_cls, loader_title, loader_widgets = LOADERS[stem]
    prefix = stem.replace("hunyuan_image3_", "HunyuanImage3_") + ("_unload" if force_unload else "")
    image_links = [2, 3] if force_unload else [2]
    nodes = [
        _ui_node(
            1,
            loader_cls,
            loader_title,
            (40, 120),
            loader_widgets,
            outputs=[{"name": "model", "type": "HUNYUAN_IMAGE3", "links": [1], "slot_index": 0}],
            size=(340, 130 + 24 * (len(loader_widgets) - 3)),
        ),
        _ui_node(
            2,
            "HunyuanImage3Generate",
            "HunyuanImage-3 Generate",
            (420, 120),
            GENERATE,
            order=1,
            inputs=[{"name": "model", "type": "HUNYUAN_IMAGE3", "link": 1}],
            outputs=[{"name": "image", "type": "IMAGE", "links": image_links, "slot_index": 0}],
            size=(400, 380),
        ),
        _ui_node(
            3,
            "SaveImage",
            "Save Image",
            (860, 120),
            [("filename_prefix", prefix)],
            order=2,
            inputs=[{"name": "images", "type": "IMAGE", "link": 2}],
            size=(512, 560),
        ),
    ]
    links = [[1, 1, 0, 2, 0, "HUNYUAN_IMAGE3"], [2, 2, 0, 3, 0, "IMAGE"]]
    api = {
        "1": {"class_type": loader_cls, "inputs": dict(loader_widgets), "_meta": {"title": loader_title}},
        "2": {
            "class_type": "HunyuanImage3Generate",
            "inputs": {"model": ["1", 0], **dict(GENERATE)},
            "_meta": {"title": "HunyuanImage-3 Generate"},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": prefix},
            "_meta": {"title": "Save Image"},
        },
    }
    if force_unload:
        nodes.append(
            _ui_node(
                4,
                "HunyuanImage3ForceUnload",
                "HunyuanImage-3 Force Unload",
                (420, 560),
                [("nuke_orphaned_tensors", False)],
                order=3,
                inputs=[{"name": "trigger", "type": "*", "link": 3}],
                outputs=[
                    {"name": "trigger", "type": "*", "links": None},
                    {"name": "report", "type": "STRING", "links": None},
                ],
                size=(400, 110),
            )
        )
        links.append([3, 2, 0, 4, 0, "IMAGE"])
        api["4"] = {
            "class_type": "HunyuanImage3ForceUnload",
            "inputs": {"nuke_orphaned_tensors": False, "trigger": ["2", 0]},
            "_meta": {"title": "HunyuanImage-3 Force Unload"},
        }
    ui = {
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }
    return ui, api


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    jobs = [(stem, stem, False) for stem in LOADERS] + [
        ("hunyuan_image3_bf16", "hunyuan_image3_force_unload", True)
    ]
    for stem, name, unload in jobs:
        ui, api = build(stem, unload)
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        (WORKFLOWS / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n", encoding="utf-8")
        print(f"wrote workflows/{name}.json and workflows/{name}.api.json")


if __name__ == "__main__":
    main()
