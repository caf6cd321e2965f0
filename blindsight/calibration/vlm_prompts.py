"""Calibration prompts for a real VLM directory: its processor builds multi-image prompts.

No image data set ships offline, so the images are drawn: each is a plain
background with a few coloured shapes, deterministic from the seed (for a
real calibration, pass prompts of your own images through the same path).
"""

from __future__ import annotations

import math
import random

import numpy as np

from blindsight import families
from blindsight.attention import find_spans
from blindsight.errors import BlindSightError
from blindsight.prompts import Encoded

DEFAULT_SIDE = 224
SHAPE_COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 70), (230, 200, 40), (20, 20, 20), (240, 240, 240)]


def drawn_image(rng: random.Random, size: int = DEFAULT_SIDE):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(rng.randrange(90, 200) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(0, size - 40), rng.randrange(0, size - 40)
        box = (x0, y0, x0 + rng.randrange(20, 40 + size // 3), y0 + rng.randrange(20, 40 + size // 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(SHAPE_COLOURS))
    return img


def check_image_tokens(fixed: int | None, image_tokens: int, what: str) -> None:
    """Refuse ``image_tokens`` per image for a model whose processor gives every image ``fixed``
    tokens (Gemma 3's ``mm_tokens_per_image``); ``what`` names the request in the message."""
    if fixed and image_tokens != fixed:
        raise BlindSightError(f"{what}: this model turns every image into {fixed} tokens; ask for IMAGES:{fixed}")


def image_side(loaded, template: dict, image_tokens: int | None) -> int:
    """Side in px of a drawn image that the family's processor turns into about ``image_tokens``
    tokens (Qwen: one token per merged patch block; Gemma 3: a fixed count, resized to its size)."""
    from blindsight.runtime.images import ImageProcessor

    if image_tokens is None:
        return DEFAULT_SIDE
    if "tokens_per_image" in template:
        check_image_tokens(int(template["tokens_per_image"]), image_tokens, f"{image_tokens} tokens per image")
        return DEFAULT_SIDE
    processor = ImageProcessor.from_directory(loaded.directory, loaded.family)
    return processor.patch_size * processor.merge_size * max(1, round(math.sqrt(image_tokens)))


def vlm_calibration_prompts(loaded, num_prompts: int, seed: int, images: tuple[int, int] = (3, 5),
                            image_tokens: int | None = None):
    """Encoded prompts (ids, spans from the family's delimiters, pixel inputs in ``extra``),
    built by bs-run's prompt builder (the family's chat template and image expansion);
    ``image_tokens``: draw images of the size that gives about that many tokens each
    (the processor's own bounds still apply)."""
    import torch

    from blindsight.models.export_vlm import build_template
    from blindsight.runtime.prompt import PromptBuilder

    template = build_template(loaded.family, loaded.model.config, loaded.directory)
    side = image_side(loaded, template, image_tokens)
    builder = PromptBuilder(loaded.directory, template)
    # what the family's processor returns beside input_ids: 1 marks an image token
    type_key = families.get(loaded.family).token_type_key
    rng = random.Random(f"vlm-calibration-{seed}")
    out = []
    for _ in range(num_prompts):
        imgs = [drawn_image(rng, side) for _ in range(rng.randint(*images))]
        question = rng.choice(["Describe the differences between these images.", "Which image has the most shapes?",
                               "What colours appear in every image?"])
        p = builder.build(imgs, question)
        types = (p.input_ids == int(template["image_token_id"])).astype(np.int64)[None]
        extra = {"pixel_values": torch.from_numpy(p.pixel_values), type_key: torch.from_numpy(types)}
        if p.image_grid_thw is not None:
            extra["image_grid_thw"] = torch.from_numpy(p.image_grid_thw)
        out.append(Encoded(p.input_ids, find_spans(p.input_ids, loaded.delimiters), extra))
    return out
