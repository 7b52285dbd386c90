"""The tiny HunyuanImage-3.0 test checkpoint: ``make_test_model(dest, variant)``."""

from .builder import VARIANTS, load_remote_code, make_test_model, wrap_moe_block

__all__ = ["VARIANTS", "load_remote_code", "make_test_model", "wrap_moe_block"]
