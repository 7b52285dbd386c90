"""The tiny HunyuanImage-3.0 test checkpoint: ``make_test_model(dest, variant)``."""

from .builder import VARIANTS, make_test_model

__all__ = ["VARIANTS", "make_test_model"]
