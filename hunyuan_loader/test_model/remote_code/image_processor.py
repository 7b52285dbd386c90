"""Image processor of the HunyuanImage-3.0 test model: resolution groups and size snapping.

Written for the ComfyUI-HunyuanImage3 test suite (not derived from the official code); it
has the interface the pack relies on, with the official behaviour:
- every requested size snaps to a bucket of the resolution group, chosen by the nearest
  height/width ratio (``argmin |r - h/w|``, first bucket wins a tie); no exact sizes;
- base: 33 buckets (1 + 16 + 16 steps of base_size // 16, align 1), exposed as
  ``reso_group`` and computed by ``build_image_info(image_size)``;
- Instruct / Distil: the same 33 plus 4 extras appended in order (1024x768, 1280x720,
  768x1024, 720x1280 as HxW, align 16), exposed as ``vae_reso_group`` and computed by
  ``build_gen_image_info(image_size)``;
- ``image_size`` is "HxW", "W:H" (Instruct) / "H:W" (base) or "<img_ratio_i>".
"""

from __future__ import annotations


class Resolution:
    """One bucket: ``h``/``height``, ``w``/``width``, ``ratio`` = h / w."""

    def __init__(self, size, *args) -> None:
        if isinstance(size, str):
            size = tuple(int(v) for v in size.split("x")) if "x" in size else int(size)
        if args:
            size = (size, args[0])
        if isinstance(size, int):
            size = (size, size)
        self.h = self.height = int(size[0])
        self.w = self.width = int(size[1])
        self.r = self.ratio = self.height / self.width

    def __str__(self) -> str:
        return f"{self.h}x{self.w}"


class ResolutionGroup:
    """Buckets walked from the square by ``step`` until 2x / 0.5x of base_size, sorted by h/w."""

    def __init__(self, base_size: int, step: int | None = None, align: int = 1, extra_resolutions=None) -> None:
        self.base_size = base_size
        self.step = step or base_size // 16
        self.align = align
        self.data = self._calc()
        for extra in extra_resolutions or []:
            if all(res.ratio != extra.ratio for res in self.data):
                self.data.append(extra)
        self.ratio = [res.ratio for res in self.data]

    def _calc(self) -> list[Resolution]:
        lo, hi, a = self.base_size // 2, self.base_size * 2, self.align
        out = [Resolution(self.base_size, self.base_size)]
        for grow_height in (True, False):
            h = w = self.base_size
            while not ((h >= hi and w <= lo) if grow_height else (h <= lo and w >= hi)):
                if grow_height:
                    h, w = min(h + self.step, hi), max(w - self.step, lo)
                else:
                    h, w = max(h - self.step, lo), min(w + self.step, hi)
                out.append(Resolution(h // a * a, w // a * a))
        return sorted(out, key=lambda res: res.ratio)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Resolution:
        return self.data[idx]

    def _nearest(self, width: float, height: float) -> int:
        target = height / width
        diffs = [abs(r - target) for r in self.ratio]
        return diffs.index(min(diffs))

    def get_target_size(self, width: float, height: float) -> tuple[int, int]:
        """(width, height) of the bucket nearest in h/w."""
        res = self.data[self._nearest(width, height)]
        return res.w, res.h

    def get_base_size_and_ratio_index(self, width: float, height: float) -> tuple[int, int]:
        return self.base_size, self._nearest(width, height)


class ImageInfo:
    """What the model will render: pixel size, token grid, bucket index."""

    def __init__(self, image_type: str, image_width: int, image_height: int, token_width: int,
                 token_height: int, base_size: int, ratio_index: int, **kwargs) -> None:
        self.image_type = image_type
        self.image_width, self.image_height = image_width, image_height
        self.token_width, self.token_height = token_width, token_height
        self.base_size, self.ratio_index = base_size, ratio_index
        self.__dict__.update(kwargs)


EXTRA_RESOLUTIONS = ("1024x768", "1280x720", "768x1024", "720x1280")


class _ImageProcessorBase:
    """Shared parsing and snapping; the variant classes expose the official method names."""

    instruct = False

    def __init__(self, config) -> None:
        self.config = config

    @property
    def group(self) -> ResolutionGroup:
        raise NotImplementedError

    def _parse(self, image_size) -> tuple[int, int]:
        """(height, width) requested by "HxW", "W:H" / "H:W", "<img_ratio_i>" or a (h, w) tuple."""
        if isinstance(image_size, (list, tuple)):
            return int(image_size[0]), int(image_size[1])
        text = str(image_size)
        if text.startswith("<img_ratio_"):
            res = self.group[int(text.split("_")[-1].rstrip(">"))]
            return res.height, res.width
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
            return h, w
        if ":" in text:
            a, b = (int(v) for v in text.split(":"))
            return (b, a) if self.instruct else (a, b)  # Instruct reads W:H, base H:W
        raise ValueError(f"`image_size` should be in the format of 'HxW', 'W:H' or <img_ratio_i>, got {image_size}.")

    def _info(self, image_size, **kwargs) -> ImageInfo:
        h, w = self._parse(image_size)
        width, height = self.group.get_target_size(w, h)
        factor = int(self.config.vae_downsample_factor[0]) * int(self.config.patch_size)
        base, idx = self.group.get_base_size_and_ratio_index(w, h)
        return ImageInfo("gen_image", width, height, width // factor, height // factor, base, idx, **kwargs)


class BaseImageProcessor(_ImageProcessorBase):
    """Base checkpoints: ``reso_group`` (33 buckets) and ``build_image_info``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.reso_group = ResolutionGroup(config.image_base_size)

    @property
    def group(self) -> ResolutionGroup:
        return self.reso_group

    def build_image_info(self, image_size) -> ImageInfo:
        return self._info(image_size)


class InstructImageProcessor(_ImageProcessorBase):
    """Instruct / Distil: ``vae_reso_group`` (37 buckets) and ``build_gen_image_info``."""

    instruct = True

    def __init__(self, config) -> None:
        super().__init__(config)
        extras = [Resolution(s) for s in EXTRA_RESOLUTIONS]
        self.vae_reso_group = ResolutionGroup(config.image_base_size, align=16, extra_resolutions=extras)

    @property
    def group(self) -> ResolutionGroup:
        return self.vae_reso_group

    def build_gen_image_info(self, image_size, add_guidance_token=False, add_timestep_r_token=False) -> ImageInfo:
        return self._info(image_size, add_guidance_token=add_guidance_token,
                          add_timestep_r_token=add_timestep_r_token)


def HunyuanImage3ImageProcessor(config) -> _ImageProcessorBase:  # noqa: N802 (the official class name)
    """The variant's processor (both official files name their class HunyuanImage3ImageProcessor)."""
    instruct = "instruct" in str(config.model_version).lower()
    return InstructImageProcessor(config) if instruct else BaseImageProcessor(config)
