"""Structural checks of our example workflows against a live server's /object_info.

UI format (the file a user drags in): every node type exists, widgets_values has one entry per
widget in the node's input order (+1 after a seed INT for the frontend's control_after_generate),
links point at existing nodes/slots with matching types. API format: every class exists, every
required input is given, combo values are in the server's list.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _is_widget(spec: Any) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO"


def widget_names(info: dict) -> list[str]:
    """Widget inputs in the order the frontend shows them (required, then optional)."""
    names = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(specs))
        for name in order:
            if _is_widget(specs[name]):
                names.append(name)
    return names


def expected_widget_values(info: dict) -> int:
    count = 0
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if not _is_widget(spec):
                continue
            count += 1
            opts = spec[1] if len(spec) > 1 else {}
            if spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                count += 1
            if opts.get("image_upload"):  # LoadImage: the frontend saves its upload button's value too
                count += 1
    return count


def check_ui(workflow: dict, object_info: dict) -> list[str]:
    errors: list[str] = []
    for key in ("nodes", "links", "version", "last_node_id", "last_link_id"):
        if key not in workflow:
            errors.append(f"missing top-level key {key!r}")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for node in nodes.values():
        info = object_info.get(node["type"])
        if info is None:
            errors.append(f"node {node['id']}: type {node['type']} is missing on the server")
            continue
        want = expected_widget_values(info)
        got = len(node.get("widgets_values", []))
        if want != got:
            errors.append(
                f"node {node['id']} {node['type']}: {got} widgets_values, server widgets need {want}"
            )
        for slot, out in enumerate(node.get("outputs", [])):
            if slot >= len(info["output"]) or (
                out["type"] != info["output"][slot] and info["output"][slot] != "*"
            ):
                errors.append(
                    f"node {node['id']}: output {slot} {out['type']} does not match {info['output']}"
                )
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, typ = link
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: unknown node")
            continue
        outs = nodes[src].get("outputs", [])
        ins = nodes[dst].get("inputs", [])
        if src_slot >= len(outs) or link_id not in (outs[src_slot].get("links") or []):
            errors.append(f"link {link_id}: not listed on output {src_slot} of node {src}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != link_id:
            errors.append(f"link {link_id}: not the link of input {dst_slot} of node {dst}")
        elif ins[dst_slot]["type"] not in (typ, "*"):
            errors.append(f"link {link_id}: type {typ} into input of type {ins[dst_slot]['type']}")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        errors.append("last_node_id below the largest node id")
    return errors


def check_api(prompt: dict, object_info: dict) -> list[str]:
    errors: list[str] = []
    for node_id, node in prompt.items():
        info = object_info.get(node.get("class_type"))
        if info is None:
            errors.append(f"{node_id}: class {node.get('class_type')} is missing on the server")
            continue
        inputs = node.get("inputs", {})
        for name in info["input"].get("required", {}):
            if name not in inputs:
                errors.append(f"{node_id} {node['class_type']}: required input {name} missing")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                value = inputs.get(name)
                if (
                    isinstance(spec[0], list)
                    and name in inputs
                    and not isinstance(value, list)
                    and value not in spec[0]
                    and name != "model_name"
                ):
                    errors.append(f"{node_id}: {name}={value!r} not in {spec[0][:8]}...")
        for name, value in inputs.items():
            if isinstance(value, list) and (len(value) != 2 or str(value[0]) not in prompt):
                errors.append(f"{node_id}: link {name}={value} points nowhere")
    return errors
