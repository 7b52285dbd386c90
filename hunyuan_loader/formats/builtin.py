"""The built-in weight formats, registered on import in this order (the loaders' quant choices keep
it: bf16, int8, nf4), and the registry's lookups: the pack imports these from here, so the built-in
formats are always registered when it looks one up (formats/registry.py)."""

from . import bf16, w8a16_format, bnb_int8, bnb_nf4  # noqa: F401,I001 - registering is importing
from .registry import (  # noqa: F401
    check_quantized_modules,
    for_config,
    for_load,
    for_model,
    get,
    loader_quants,
    owner_of,
    quantization_config,
    quantized_module_names,
)
