"""From images and a question to the token ids and pixel values of a VLM prompt.

Does what the family's transformers processor does, with its tokenizer and
image processor read from the export directory: renders the chat template
(when there is one) with one image part per image, then expands each image
placeholder into the image's tokens. Neither torch nor transformers is
needed: the tokenizer and template come from blindsight.runtime.tokenizer
(``tokenizers`` + ``jinja2``), the pixels from blindsight.runtime.images
(numpy + Pillow), both equal to transformers' outputs (tests/test_runtime_no_torch.py).

Where the images go: at each ``<image>`` marker in the prompt text, in order,
or, with no marker, all before the text (the usual "images, then question").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from blindsight import families
from blindsight.errors import BlindSightError

IMAGE_MARKER = "<image>"


@dataclasses.dataclass
class Prompt:
    input_ids: np.ndarray  # int64 [S]
    pixel_values: np.ndarray | None  # Qwen: [patches, C*T*P*P]; Gemma 3: [N, 3, H, W]
    image_grid_thw: np.ndarray | None  # Qwen: int64 [N, 3]
    text: str  # the rendered prompt before image expansion
    num_images: int


def load_images(images) -> list:
    """PIL images from PIL images or paths; a path that is not an image is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
            continue
        path = Path(im)
        if not path.is_file():
            raise BlindSightError(f"image {str(path)!r} does not exist; pass an existing image file")
        try:
            with Image.open(path) as f:
                out.append(f.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise BlindSightError(f"image {str(path)!r} cannot be read as an image ({exc})") from None
    return out


def split_prompt(prompt: str, num_images: int) -> list[dict]:
    """Chat content parts: text pieces and image parts, images at the markers or first."""
    pieces = prompt.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers == 0:
        parts = [{"type": "image"} for _ in range(num_images)]
        return parts + ([{"type": "text", "text": prompt}] if prompt else [])
    if markers != num_images:
        raise BlindSightError(
            f"the prompt has {markers} {IMAGE_MARKER} marker(s) but {num_images} image(s) were given; "
            f"use one marker per image or none (images then go before the text)")
    parts = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < markers:
            parts.append({"type": "image"})
    return parts


class PromptBuilder:
    """Builds prompts for one export directory (its tokenizer, image processor and template.json)."""

    def __init__(self, out_dir, template: dict):
        from blindsight.runtime.tokenizer import Tokenizer

        self.template = template
        self.family = template["family"]
        self.spec = families.get(self.family)
        self.tokenizer = Tokenizer(out_dir)
        self._image_processor = None
        self._out_dir = str(out_dir)
        tok = self.tokenizer.convert_ids_to_tokens
        self.image_token = tok(int(template["image_token_id"]))
        self.image_start = tok(int(template["image_start_id"]))
        self.image_end = tok(int(template["image_end_id"]))

    @property
    def image_processor(self):
        if self._image_processor is None:
            from blindsight.runtime.images import ImageProcessor

            self._image_processor = ImageProcessor.from_directory(self._out_dir, self.family)
        return self._image_processor

    def _format(self, fmt: str, **extra) -> str:
        """A family's prompt format (Family.image_placeholder ...) over this tokenizer's image tokens."""
        return fmt.format(start=self.image_start, image=self.image_token, end=self.image_end, **extra)

    def _placeholder(self) -> str:
        """What the chat template writes for one image, before expansion."""
        return self._format(self.spec.image_placeholder)

    def render(self, prompt: str, num_images: int, chat: bool = True) -> str:
        return self.render_messages([{"role": "user", "content": split_prompt(prompt, num_images)}], chat)

    def render_messages(self, messages: list[dict], chat: bool = True) -> str:
        """The chat template over the messages (image parts where the images go);
        without a template (or ``chat`` off), their parts in order."""
        if chat and self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = ""
        for m in messages:
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            text += "".join(self._placeholder() if p["type"] == "image" else p["text"] for p in parts)
        return text

    def _expand(self, text: str, counts: list[int]) -> str:
        """Each image placeholder -> the image's full token sequence, as the family's processor does."""
        seq = lambda n: self._format(self.spec.image_expansion, images=self.image_token * n)
        key = self._format(self.spec.expansion_key)
        pieces = text.split(key)
        if len(pieces) - 1 != len(counts):
            raise BlindSightError(
                f"the rendered prompt holds {len(pieces) - 1} image placeholder(s) for {len(counts)} image(s); "
                f"do not write {key!r} in the prompt text, use {IMAGE_MARKER} markers")
        return pieces[0] + "".join(seq(n) + p for n, p in zip(counts, pieces[1:]))

    def build(self, images, prompt: str, chat: bool = True) -> Prompt:
        """The prompt of one user turn: ``prompt`` with the images at its markers (or first)."""
        images = load_images(images)
        return self._build(images, self.render(prompt, len(images), chat))

    def build_messages(self, images, messages: list[dict], chat: bool = True) -> Prompt:
        """The prompt of a conversation (chat messages whose image parts take ``images`` in order):
        for one user message, what :meth:`build` makes of the same text with markers."""
        images = load_images(images)
        return self._build(images, self.render_messages(messages, chat))

    def _build(self, images: list, text: str) -> Prompt:
        """Each image placeholder of the rendered ``text`` expanded into its tokens, then tokenized."""
        pixel_values = grid = None
        counts: list[int] = []
        if images:
            px = self.image_processor(images)  # the family's image_processor_kwargs are applied inside
            pixel_values = np.asarray(px["pixel_values"], dtype=np.float32)
            if self.spec.vision_tower == families.QWEN_VISION:
                # variable-size images: a patch grid each, tokens = patches / merge^2
                grid = np.asarray(px["image_grid_thw"], dtype=np.int64)
                merge = int(self.template["spatial_merge_size"])
                counts = (grid.prod(-1) // merge**2).tolist()
            else:
                counts = [int(self.template["tokens_per_image"])] * len(images)
        full = self._expand(text, counts)
        bos = self.tokenizer.bos_token
        # a chat template that writes <bos> itself must not get a second one
        add_special = not (bos and full.startswith(bos))
        ids = np.asarray(self.tokenizer.encode(full, add_special_tokens=add_special), dtype=np.int64)
        return Prompt(ids, pixel_values, grid, text, len(images))

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
