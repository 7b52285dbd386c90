"""The fixed choices of the loaders and of Generate, in a module that imports nothing (not even
torch), so that the command line can build its parser and answer ``--help`` before anything heavy
loads. spec.py, devices.py and request.py re-export them."""

from __future__ import annotations

OFFLOAD_MODES = ("disabled", "smart", "budget", "accelerate")
MOE_IMPLS = ("gather_scatter", "reference")
# INT8 kernels: "w8a16" int8 weights x bf16 activations (fused Triton kernel on CUDA, formats/w8a16.py);
# "bnb" bitsandbytes LLM.int8. Only meaningful with quant "int8" (normalised to the default otherwise).
INT8_FORMATS = ("w8a16", "bnb")
MULTI_GPU_MODES = ("auto", "split", "cfg_parallel", "off")  # the loaders' multi_gpu input (memory.devices.choose_mode)
# bot_task values of the official Instruct generate_image that change what it does ("auto" draws like
# "image"; "img_ratio" is internal). think / recaption / think_recaption write text before drawing.
BOT_TASKS = ("image", "think", "recaption", "think_recaption")
DEFAULT_MAX_NEW_TOKENS = 2048  # the official generate_image default
