"""The official model's module tree, in one place: where the decoder blocks and their MoE blocks are.

Names from the official code (hunyuan.py / modeling_hunyuan_image_3.py): ``model.layers.N`` are the
decoder blocks (``HunyuanImage3DecoderLayer``, the class in ``_no_split_modules``); a block's ``mlp``
is the MoE block: ``gate.wg`` (the float32 router), ``experts`` (a ModuleList), ``shared_mlp``.
"""

from __future__ import annotations

from torch import nn


def is_moe_block(module: nn.Module) -> bool:
    """A MoE block, found by structure: ``.gate`` with ``.wg``, ``.experts`` (ModuleList)."""
    gate = module._modules.get("gate")
    experts = module._modules.get("experts")
    return gate is not None and hasattr(gate, "wg") and isinstance(experts, nn.ModuleList)


def find_moe_blocks(model: nn.Module) -> list[nn.Module]:
    """MoE blocks found by structure: ``.gate`` with ``.wg``, ``.experts`` (ModuleList), optional ``.shared_mlp``."""
    return [m for m in model.modules() if is_moe_block(m)]
