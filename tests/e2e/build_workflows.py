"""Writes the example workflows in workflows/ (UI format *.json and API format *.api.json).

    python tests/e2e/build_workflows.py      # from the pack root; rewrites workflows/

One description per workflow, two renderings, so both formats always say the same thing.
The Instruct workflows (edit, 2-image fusion, think + recaption) feed LoadImage nodes into the
Generate node's image_1 / image_2 and its `text` output into ComfyUI's Preview Any node; their
example images (INSTRUCT_IMAGES, shipped in workflows/input/) must be in ComfyUI's input folder (the e2e runner
writes them there).
Widget order follows the nodes' INPUT_TYPES (required, then optional); the UI format adds the
frontend's control_after_generate value after `seed`. run_comfyui_e2e.py checks both formats
against the live server's /object_info.
"""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
MODEL_NAME = "HunyuanImage-3"  # ComfyUI/models/HunyuanImage-3/HunyuanImage-3, as the README says
INSTRUCT_MODEL_NAME = "HunyuanImage-3-Instruct"  # ComfyUI/models/HunyuanImage-3/HunyuanImage-3-Instruct
PROMPT = "a red fox in fresh snow, morning light, photograph"

_GPUS = [("devices", "auto"), ("multi_gpu", "auto")]
LOADERS = {
    # file stem: (class, title, [(widget, value)...]) in INPUT_TYPES order (required, then optional)
    "hunyuan_image3_int8": (
        "HunyuanImage3LoaderINT8",
        "HunyuanImage-3 Loader (INT8)",
        [("model_name", MODEL_NAME), ("offload_mode", "disabled"), ("moe_impl", "gather_scatter"), *_GPUS,
         ("save_quantized_copy", False), ("int8_format", "w8a16")],
    ),
    "hunyuan_image3_nf4": (
        "HunyuanImage3LoaderNF4",
        "HunyuanImage-3 Loader (NF4)",
        [("model_name", MODEL_NAME), ("offload_mode", "disabled"), ("moe_impl", "gather_scatter"), *_GPUS,
         ("save_quantized_copy", False)],
    ),
    "hunyuan_image3_bf16": (
        "HunyuanImage3LoaderBF16",
        "HunyuanImage-3 Loader (BF16)",
        [("model_name", MODEL_NAME), ("offload_mode", "smart"), ("moe_impl", "gather_scatter"), *_GPUS],
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
            *_GPUS,
            ("int8_format", "w8a16"),
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
    ("bot_task", "image"),
    ("max_new_tokens", 2048),
    ("infer_align_image_size", True),
    ("step_cache", "off"),
    ("cache_interval", 5),
    ("cache_order", 2),
    ("cache_first_steps", 3),
    ("cache_last_steps", 0),
]
# Text to image with the official Taylor step cache (about 4x faster at 50 steps): loader stem, overrides
STEP_CACHE = {"hunyuan_image3_step_cache": ("hunyuan_image3_int8", {"step_cache": "taylor"})}
INSTRUCT_IMAGES = ("hunyuan_image3_example_1.png", "hunyuan_image3_example_2.png")

# Instruct workflows: stem -> (loader stem, images, Generate widget overrides)
INSTRUCT = {
    "hunyuan_image3_instruct_edit": (
        "hunyuan_image3_int8", INSTRUCT_IMAGES[:1],
        {"prompt": "make it a snowy winter evening, keep the composition", "resolution": "auto"},
    ),
    "hunyuan_image3_instruct_fusion": (
        "hunyuan_image3_nf4", INSTRUCT_IMAGES,
        {"prompt": "the object of image 1 made of the material of image 2, studio photograph",
         "resolution": "1024x1024"},
    ),
    "hunyuan_image3_instruct_think": (
        "hunyuan_image3_int8", INSTRUCT_IMAGES[:1],
        {"prompt": "turn this into a vintage travel poster for the place it shows", "resolution": "1024x1024",
         "bot_task": "think_recaption"},
    ),
}


TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its pos (LiteGraph.NODE_TITLE_HEIGHT)
GAP = 40  # between a node's bottom and the next node's title bar


GENERATE_HEIGHT = 560  # Generate's sockets and widgets (the step cache's included), as the frontend lays them out


def loader_size(widgets: list) -> tuple[int, int]:
    """A loader's saved size: tall enough for all of its widgets (24 px a widget, as the frontend lays them out),
    so no node placed below it covers them."""
    return 340, 130 + 24 * (len(widgets) - 3)


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


def build(stem: str, force_unload: bool = False, name: str | None = None,
          overrides: dict | None = None) -> tuple[dict, dict]:
    loader_cls, loader_title, loader_widgets = LOADERS[stem]
    prefix = (name or stem).replace("hunyuan_image3_", "HunyuanImage3_") + ("_unload" if force_unload else "")
    generate = [(k, (overrides or {}).get(k, v)) for k, v in GENERATE]
    image_links = [2, 3] if force_unload else [2]
    nodes = [
        _ui_node(
            1,
            loader_cls,
            loader_title,
            (40, 120),
            loader_widgets,
            outputs=[{"name": "model", "type": "HUNYUAN_IMAGE3", "links": [1], "slot_index": 0}],
            size=loader_size(loader_widgets),
        ),
        _ui_node(
            2,
            "HunyuanImage3Generate",
            "HunyuanImage-3 Generate",
            (420, 120),
            generate,
            order=1,
            inputs=[{"name": "model", "type": "HUNYUAN_IMAGE3", "link": 1}],
            outputs=[{"name": "image", "type": "IMAGE", "links": image_links, "slot_index": 0},
                     {"name": "text", "type": "STRING", "links": None, "slot_index": 1}],
            size=(400, GENERATE_HEIGHT),
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
            "inputs": {"model": ["1", 0], **dict(generate)},
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
                (420, 120 + GENERATE_HEIGHT + GAP + TITLE_HEIGHT),  # below Generate
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


def build_instruct(name: str) -> tuple[dict, dict]:
    """Loader -> Generate (LoadImage nodes into image_1.., text into Preview Any) -> Save Image."""
    loader_stem, images, overrides = INSTRUCT[name]
    loader_cls, loader_title, loader_widgets = LOADERS[loader_stem]
    loader_widgets = [(k, INSTRUCT_MODEL_NAME if k == "model_name" else v) for k, v in loader_widgets]
    generate = [(k, overrides.get(k, v)) for k, v in GENERATE]
    prefix = name.replace("hunyuan_image3_", "HunyuanImage3_")
    gen_id, save_id, preview_id = 2, 3, 4
    image_ids = [5 + i for i in range(len(images))]
    # links: 1 model, 2 image -> save, 3 text -> preview, 4.. LoadImage -> image_i
    links = [[1, 1, 0, gen_id, 0, "HUNYUAN_IMAGE3"], [2, gen_id, 0, save_id, 0, "IMAGE"],
             [3, gen_id, 1, preview_id, 0, "STRING"]]
    gen_inputs = [{"name": "model", "type": "HUNYUAN_IMAGE3", "link": 1}]
    nodes = []
    loader_w, loader_h = loader_size(loader_widgets)
    image_h, first_y = 340, 120 + loader_h + GAP + TITLE_HEIGHT  # the images start below the loader's widgets
    for i, (node_id, file) in enumerate(zip(image_ids, images)):
        link_id = 4 + i
        links.append([link_id, node_id, 0, gen_id, 1 + i, "IMAGE"])
        gen_inputs.append({"name": f"image_{i + 1}", "type": "IMAGE", "link": link_id})
        y = first_y + (image_h + GAP + TITLE_HEIGHT) * i
        nodes.append(_ui_node(
            node_id, "LoadImage", f"Reference image {i + 1}", (40, y), [("image", file), ("upload", "image")],
            outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [link_id], "slot_index": 0},
                     {"name": "MASK", "type": "MASK", "links": None, "slot_index": 1}],
            size=(loader_w, image_h),
        ))
    nodes += [
        _ui_node(1, loader_cls, loader_title, (40, 120), loader_widgets,
                 outputs=[{"name": "model", "type": "HUNYUAN_IMAGE3", "links": [1], "slot_index": 0}],
                 size=(loader_w, loader_h)),
        _ui_node(gen_id, "HunyuanImage3Generate", "HunyuanImage-3 Generate", (420, 120), generate, order=1,
                 inputs=gen_inputs,
                 outputs=[{"name": "image", "type": "IMAGE", "links": [2], "slot_index": 0},
                          {"name": "text", "type": "STRING", "links": [3], "slot_index": 1}],
                 size=(400, GENERATE_HEIGHT)),
        _ui_node(save_id, "SaveImage", "Save Image", (860, 120), [("filename_prefix", prefix)], order=2,
                 inputs=[{"name": "images", "type": "IMAGE", "link": 2}], size=(512, 560)),
        _ui_node(preview_id, "PreviewAny", "Model text", (860, 720), [], order=3,
                 inputs=[{"name": "source", "type": "*", "link": 3}], size=(512, 200)),
    ]
    api: dict = {
        "1": {"class_type": loader_cls, "inputs": dict(loader_widgets), "_meta": {"title": loader_title}},
        str(gen_id): {
            "class_type": "HunyuanImage3Generate",
            "inputs": {"model": ["1", 0], **dict(generate),
                       **{f"image_{i + 1}": [str(node_id), 0] for i, node_id in enumerate(image_ids)}},
            "_meta": {"title": "HunyuanImage-3 Generate"},
        },
        str(save_id): {"class_type": "SaveImage", "inputs": {"images": [str(gen_id), 0], "filename_prefix": prefix},
                       "_meta": {"title": "Save Image"}},
        str(preview_id): {"class_type": "PreviewAny", "inputs": {"source": [str(gen_id), 1]},
                          "_meta": {"title": "Model text"}},
    }
    for i, (node_id, file) in enumerate(zip(image_ids, images)):
        api[str(node_id)] = {"class_type": "LoadImage", "inputs": {"image": file},
                             "_meta": {"title": f"Reference image {i + 1}"}}
    ui = {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": sorted(nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }
    return ui, api


def write_example_images(folder: Path) -> list[Path]:
    """The Instruct workflows' reference images (simple synthetic pictures) into ``folder``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(INSTRUCT_IMAGES):
        image = Image.new("RGB", (768, 512) if i == 0 else (512, 640), (40 + 90 * i, 110, 200 - 80 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((120, 80, 420, 380), fill=(230, 200 - 60 * i, 60 + 80 * i))
        draw.rectangle((0, image.height - 120, image.width, image.height), fill=(70, 150 - 40 * i, 70))
        path = folder / name
        image.save(path)
        out.append(path)
    return out


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    jobs = [(stem, stem, False) for stem in LOADERS] + [
        ("hunyuan_image3_bf16", "hunyuan_image3_force_unload", True)
    ] + [(None, name, False) for name in INSTRUCT] + [(stem, name, False) for name, (stem, _) in STEP_CACHE.items()]
    for stem, name, unload in jobs:
        if name in STEP_CACHE:
            ui, api = build(stem, name=name, overrides=STEP_CACHE[name][1])
        else:
            ui, api = build(stem, unload) if stem is not None else build_instruct(name)
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        (WORKFLOWS / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n", encoding="utf-8")
        print(f"wrote workflows/{name}.json and workflows/{name}.api.json")
    for path in write_example_images(WORKFLOWS / "input"):  # shipped: users copy them into ComfyUI/input
        print(f"wrote {path.relative_to(WORKFLOWS.parent)}")


if __name__ == "__main__":
    main()
