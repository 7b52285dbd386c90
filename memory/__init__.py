"""VRAM estimation, weight residency (GPU / streamed / CPU RAM) and unloading."""
