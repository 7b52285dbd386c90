"""Model cache, loading, variants and generation for HunyuanImage-3.0.

Import it through the pack (``from <pack>.hunyuan_loader import cache``); this file
stays empty so that ``python -m hunyuan_loader`` can bootstrap the pack first.
"""
