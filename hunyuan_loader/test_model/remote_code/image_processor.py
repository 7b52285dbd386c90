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

Instruct reference images (official image_processor.py:404-545, 614-700), the interface the pack
counts tokens with: ``build_cond_images(image_list, infer_align_image_size)`` turns each image (a PIL
image or a path) into a joint VAE + ViT condition (``cond_image_type`` "vae_vit"). The VAE half is the
image resized and centre-cropped (``infer_align_image_size``: stretched) to the bucket
``vae_reso_group.get_target_size(w, h)`` picks, ``token_height x token_width`` =
size // ``vae_info.h_factor`` / ``w_factor`` tokens; the ViT half goes through transformers' Siglip2 image
processor (``vit_processor``, kwargs from ``config.vit_processor``) and is padded to
``vit_info.max_token_length`` (= its ``max_num_patches``) tokens. ``postprocess_outputs`` resizes the
result to a reference image's aspect ratio when ``infer_align_image_size`` asks for it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


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


def resize_and_crop(image: Image.Image, target_size: tuple[int, int], crop_type: str = "center") -> Image.Image:
    """Resize to cover ``target_size`` (width, height) keeping the aspect ratio, then centre-crop;
    ``crop_type="resize"`` stretches to the target instead."""
    tw, th = target_size
    if crop_type == "resize":
        return image.resize((tw, th), resample=Image.Resampling.LANCZOS)
    if crop_type != "center":
        raise ValueError(f"crop_type must be 'center' or 'resize', got {crop_type!r}")
    w, h = image.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    image = image.resize((rw, rh), resample=Image.Resampling.LANCZOS)
    left, top = round((rw - tw) / 2), round((rh - th) / 2)
    return image.crop((left, top, left + tw, top + th))


class CondImage:
    """One reference image as the model sees it: ``vae_image`` and ``vit_image`` tensors, each with
    its ImageInfo in ``.i``; ``section_type`` "cond_joint_image"; ``i.image_token_length`` is the sum."""

    def __init__(self, image_type: str, vae_image: torch.Tensor, vit_image: torch.Tensor) -> None:
        self.image_type = image_type
        self.vae_image, self.vit_image = vae_image, vit_image
        self.section_type = "cond_joint_image"
        self.i = SimpleNamespace(
            vae_image_info=vae_image.i, vision_image_info=vit_image.i,
            image_token_length=vae_image.i.image_token_length + vit_image.i.image_token_length,
        )


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
    """Instruct / Distil: ``vae_reso_group`` (37 buckets), ``build_gen_image_info`` and the reference-image
    path (``build_cond_images``, ``vae_info``, ``vit_info``, ``postprocess_outputs``)."""

    instruct = True

    def __init__(self, config) -> None:
        try:  # transformers 5.x: the PIL backend (its Siglip2ImageProcessor needs torchvision)
            from transformers.models.siglip2.image_processing_pil_siglip2 import (
                Siglip2ImageProcessorPil as Siglip2ImageProcessor,
            )
        except ImportError:  # transformers 4.x: the slow (PIL/numpy) processor
            from transformers.models.siglip2.image_processing_siglip2 import Siglip2ImageProcessor

        super().__init__(config)
        extras = [Resolution(s) for s in EXTRA_RESOLUTIONS]
        self.vae_reso_group = ResolutionGroup(config.image_base_size, align=16, extra_resolutions=extras)
        factor = int(config.vae_downsample_factor[0]) * int(config.patch_size)
        self.vae_info = SimpleNamespace(image_type="vae", h_factor=factor, w_factor=factor)
        if config.vit_type != "siglip2-so400m-patch16-naflex":
            raise ValueError(f"Unsupported vit_type: {config.vit_type}")
        # The official code uses the fast (torchvision) Siglip2 processor; the PIL one gives the same
        # interface (patch_size, max_num_patches, pixel_values / spatial_shapes / pixel_attention_mask).
        self.vit_processor = Siglip2ImageProcessor(**dict(config.vit_processor))
        patch = int(self.vit_processor.patch_size)
        self.vit_info = SimpleNamespace(
            image_type="siglip2", h_factor=patch, w_factor=patch,
            max_token_length=int(self.vit_processor.max_num_patches), processor=self.vit_processor,
        )
        self.cond_image_type = config.cond_image_type
        self.cond_token_attn_type = config.cond_token_attn_type

    # ---- reference images
    def vae_process_image(self, image: Image.Image, target_size: tuple[int, int], random_crop=False) -> torch.Tensor:
        """Resize/crop to ``target_size`` (width, height); a [3, H, W] tensor in -1..1 with ``.i``."""
        crop = random_crop if isinstance(random_crop, str) else "center"
        resized = resize_and_crop(image, target_size, crop_type=crop)
        array = np.asarray(resized.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        w, h = resized.size
        th, tw = h // self.vae_info.h_factor, w // self.vae_info.w_factor
        base, idx = self.vae_reso_group.get_base_size_and_ratio_index(w, h)
        tensor.i = ImageInfo("vae", w, h, tw, th, base, idx, image_token_length=th * tw,
                             ori_image_width=image.size[0], ori_image_height=image.size[1])
        tensor.section_type = "cond_vae_image"
        return tensor

    def vit_process_image(self, image: Image.Image) -> torch.Tensor:
        """Siglip2 patches [max_num_patches, 3 * patch^2] with ``.i`` and ``.vision_encoder_kwargs``."""
        out = self.vit_info.processor(image.convert("RGB"), return_tensors="pt")
        pixels = out["pixel_values"].squeeze(0)
        shapes, mask = out["spatial_shapes"].squeeze(0), out["pixel_attention_mask"].squeeze(0)
        th, tw = int(shapes[0]), int(shapes[1])
        pixels.i = ImageInfo("siglip2", tw * self.vit_info.w_factor, th * self.vit_info.h_factor, tw, th, None, None,
                             image_token_length=self.vit_info.max_token_length,
                             ori_image_width=image.size[0], ori_image_height=image.size[1])
        pixels.section_type = "cond_vit_image"
        pixels.vision_encoder_kwargs = {"spatial_shapes": shapes, "pixel_attention_mask": mask}
        return pixels

    def get_image_with_size(self, src, random_crop=False, return_type: str = "vae"):
        """(tensor or CondImage, True) for one image (a PIL image or anything transformers' load_image reads)."""
        from transformers.image_utils import load_image

        image = load_image(src)
        vae = vit = None
        if "vae" in return_type:
            vae = self.vae_process_image(image, self.vae_reso_group.get_target_size(*image.size), random_crop)
        if "vit" in return_type:
            vit = self.vit_process_image(image)
        if return_type == "vae_vit":
            return CondImage(return_type, vae, vit), True
        if return_type in ("vae", "vit"):
            return (vae if return_type == "vae" else vit), True
        raise ValueError(f"Unknown return_type: {return_type}")

    def build_cond_images(self, image_list=None, message_list=None, infer_align_image_size: bool = False):
        """One condition per image, in order (the official accepts a list of any length)."""
        if image_list is not None and message_list is not None:
            raise ValueError("`image_list` and `message_list` cannot be provided at the same time.")
        if message_list is not None:
            image_list = [
                item[key]
                for message in message_list
                for item in message["content"]
                if isinstance(item, dict) and item.get("type") == "image"
                for key in ("image", "url", "path", "base64")
                if key in item
            ]
        crop = "resize" if infer_align_image_size else "center"
        return [self.get_image_with_size(src, random_crop=crop, return_type=self.cond_image_type)[0]
                for src in image_list]

    def postprocess_outputs(self, outputs: list, batch_cond_images, infer_align_image_size: bool = False) -> list:
        """With ``infer_align_image_size``: when the output's bucket is a reference image's bucket and that
        image's own aspect ratio differs from the bucket's by 0.01 or more, resize the output to the
        image's aspect ratio at base_size^2 pixels (the first such image wins)."""
        if not infer_align_image_size or batch_cond_images is None:
            return outputs
        group = self.vae_reso_group
        for index, (output, conds) in enumerate(zip(outputs, batch_cond_images)):
            out_idx = group.get_base_size_and_ratio_index(output.width, output.height)[1]
            for cond in conds:
                info = cond.vae_image.i if isinstance(cond, CondImage) else cond.i
                if info.ratio_index != out_idx:
                    continue
                ow, oh = info.ori_image_width, info.ori_image_height
                if abs(oh / ow - group[out_idx].ratio) >= 0.01:
                    scale = math.sqrt(group.base_size**2 / (ow * oh))
                    outputs[index] = output.resize((round(ow * scale), round(oh * scale)),
                                                   resample=Image.Resampling.LANCZOS)
                break
        return outputs

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
