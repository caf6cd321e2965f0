"""Image preprocessing in numpy and Pillow, as the families' transformers image processors do.

Reads the export's ``preprocessor_config.json`` (or ``processor_config.json``'s
``image_processor`` entry) and follows transformers' PIL-backend processors
step by step, so the pixels are the same bit for bit: Pillow resizes the
uint8 RGB image with the configured filter, then rescale (float64 multiply,
cast to float32) and normalize ((x - mean) / std in float32).

- Qwen2-VL / Qwen2.5-VL (``Qwen2VLImageProcessor``): ``smart_resize`` to sides
  that are multiples of patch_size * merge_size with min_pixels <= area <=
  max_pixels, then patchify into [grid_h * grid_w, 3 * T * P * P] in
  merge-block order, each patch repeated temporal_patch_size times (a still
  image is T identical frames); ``image_grid_thw`` = [1, grid_h, grid_w].
- Gemma 3 (``Gemma3ImageProcessor``, SigLIP's): resize to size.height x
  size.width, [N, 3, H, W] (pan-and-scan is not done: the family turns it off).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from blindsight import families
from blindsight.errors import BlindSightError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's filter numbers, as preprocessor_config.json writes them
BILINEAR, BICUBIC = 2, 3
QWEN_DEFAULTS = dict(resample=BICUBIC, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                     size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                     patch_size=14, temporal_patch_size=2, merge_size=2)
SIGLIP_DEFAULTS = dict(resample=BILINEAR, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                       size={"height": 224, "width": 224})


def load_processor_config(directory) -> dict:
    """The image processor's settings: preprocessor_config.json, else processor_config.json's entry."""
    import json

    directory = Path(directory)
    pre, proc = directory / "preprocessor_config.json", directory / "processor_config.json"
    if pre.is_file():
        return json.loads(pre.read_text(encoding="utf-8"))
    if proc.is_file() and isinstance(entry := json.loads(proc.read_text(encoding="utf-8")).get("image_processor"), dict):
        return entry
    raise BlindSightError(f"{directory} has no preprocessor_config.json (nor an image_processor entry in "
                          f"processor_config.json); copy it from the checkpoint or run bs-export again")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: sides divisible by ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise BlindSightError(f"an image of {width}x{height} is too elongated for Qwen's processor "
                              f"(aspect ratio {max(height, width) / min(height, width):.0f}, at most 200)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[C, H, W] -> [grid_h * grid_w, C * T * P * P], patches in merge-block order."""
    image = np.asarray(image, dtype=np.float32)
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    patches = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
    return patches.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


class ImageProcessor:
    """``__call__(images) -> {"pixel_values", ["image_grid_thw"]}`` for one family's processor settings."""

    def __init__(self, config: dict, family: str, **overrides):
        spec = families.get(family)
        self.qwen = spec.vision_tower == families.QWEN_VISION
        cfg = {**(QWEN_DEFAULTS if self.qwen else SIGLIP_DEFAULTS), **config, **dict(spec.image_processor_kwargs), **overrides}
        if cfg.get("do_pan_and_scan"):
            raise BlindSightError("pan-and-scan (do_pan_and_scan) is not supported; the export's tower takes one crop per image")
        self.resample = int(cfg["resample"])
        self.do_resize = cfg.get("do_resize", True)
        self.do_rescale = cfg.get("do_rescale", True)
        self.do_normalize = cfg.get("do_normalize", True)
        self.rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = np.asarray(cfg["image_mean"], np.float32)
        self.std = np.asarray(cfg["image_std"], np.float32)
        size = dict(cfg["size"])
        if self.qwen:
            # min_pixels / max_pixels (older configs, or set apart from size) override size
            self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels"))
            self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels"))
            self.patch_size, self.merge_size = int(cfg["patch_size"]), int(cfg["merge_size"])
            self.temporal_patch_size = int(cfg["temporal_patch_size"])
        else:
            if "height" not in size or "width" not in size:
                raise BlindSightError(f"the image processor's size {size} has no height and width")
            self.height, self.width = int(size["height"]), int(size["width"])

    @classmethod
    def from_directory(cls, directory, family: str) -> "ImageProcessor":
        return cls(load_processor_config(directory), family)

    def _pixels(self, image, height: int, width: int) -> np.ndarray:
        """One RGB PIL image -> float32 [3, H, W]: resize, rescale, normalize."""
        if self.do_resize:
            image = image.resize((width, height), resample=self.resample)
        x = np.moveaxis(np.asarray(image), -1, 0)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.do_normalize:
            x = ((x.T - self.mean) / self.std).T
        return x

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = [im.convert("RGB") for im in images]
        if not self.qwen:
            return {"pixel_values": np.stack([self._pixels(im, self.height, self.width) for im in images])}
        patches, grids = [], []
        for im in images:
            h, w = im.height, im.width
            if self.do_resize:
                h, w = smart_resize(h, w, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
            x = self._pixels(im, h, w)
            patches.append(patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size))
            grids.append([1, h // self.patch_size, w // self.patch_size])
        return {"pixel_values": np.concatenate(patches, axis=0), "image_grid_thw": np.asarray(grids, np.int64)}
