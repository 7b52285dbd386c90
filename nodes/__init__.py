"""ComfyUI node classes (thin: inputs, outputs, tooltips) that call the library; the pack's __init__.py
registers them."""
