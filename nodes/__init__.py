"""ComfyUI node classes (thin: inputs, outputs, tooltips) that call the library."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
