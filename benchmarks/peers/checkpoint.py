"""The checkpoint every engine converts: the given one with its image processor's pixel bounds fixed.

Engines read Qwen2-VL's pixel bounds from different keys of preprocessor_config.json
(transformers 5 writes ``size.shortest_edge``/``size.longest_edge``; OpenVINO GenAI
reads ``min_pixels``/``max_pixels`` and falls back to its own defaults), so the same
image can become a different number of image tokens per engine. The prepared copy
writes both forms with one value each; every other file is a symlink to the original,
so a 9 GB checkpoint costs nothing to prepare.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from benchmarks.peers.errors import PeersError

PROCESSOR = "preprocessor_config.json"
#: what transformers' Qwen2-VL processor uses when the file gives no bounds
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def check_checkpoint(path: Path) -> dict:
    """The checkpoint's config.json, or one line saying what is wrong with ``path``."""
    if not path.is_dir():
        raise PeersError(f"checkpoint {path} is not a directory; write one with bs-checkpoint tiny-qwen2-vl -o {path}")
    config = path / "config.json"
    if not config.is_file():
        raise PeersError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    if not (path / PROCESSOR).is_file():
        raise PeersError(f"{path} has no {PROCESSOR}: the engines need the image processor's settings")
    doc = json.loads(config.read_text())
    if doc.get("model_type") not in ("qwen2_vl", "qwen2_5_vl"):
        raise PeersError(f"{path} is a {doc.get('model_type')!r} checkpoint; the peers harness runs Qwen2-VL and Qwen2.5-VL")
    return doc


def pixel_bounds(processor: dict, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The bounds to fix: the given ones, else what the checkpoint's processor uses
    (explicit keys first, as transformers reads them)."""
    size = processor.get("size") or {}
    lo = min_pixels or processor.get("min_pixels") or size.get("shortest_edge") or QWEN_MIN_PIXELS
    hi = max_pixels or processor.get("max_pixels") or size.get("longest_edge") or QWEN_MAX_PIXELS
    if lo > hi:
        raise PeersError(f"min pixels {lo} is above max pixels {hi}")
    return int(lo), int(hi)


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of the checkpoint's files: a changed or
    rewritten checkpoint gets new conversions."""
    rows = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.iterdir() if p.is_file())
    return hashlib.sha256("\n".join([str(path.resolve()), *rows]).encode()).hexdigest()[:12]


def prepare(src: Path, cache: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[Path, dict]:
    """The prepared checkpoint under ``cache`` and the processor settings written into it."""
    from blindsight.runtime.images import ImageProcessor

    config = check_checkpoint(src)
    processor = json.loads((src / PROCESSOR).read_text())
    # patch and merge sizes as the project's own image processor reads them (with Qwen's defaults)
    image = ImageProcessor(processor, config["model_type"])
    lo, hi = pixel_bounds(processor, min_pixels, max_pixels)
    key = hashlib.sha256(f"{fingerprint(src)}:{lo}:{hi}".encode()).hexdigest()[:12]
    out = cache / f"checkpoint-{key}"
    settings = {"min_pixels": lo, "max_pixels": hi, "source": str(src.resolve()),
                "patch_size": image.patch_size, "merge_size": image.merge_size}
    if (out / PROCESSOR).is_file():
        return out, settings
    tmp = cache / f".checkpoint-{key}.{os.getpid()}"
    tmp.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != PROCESSOR:
            (tmp / item.name).symlink_to(item.resolve())
    fixed = dict(processor, min_pixels=lo, max_pixels=hi,
                 size=dict(processor.get("size") or {}, shortest_edge=lo, longest_edge=hi))
    (tmp / PROCESSOR).write_text(json.dumps(fixed, indent=2) + "\n")
    tmp.rename(out)
    return out, settings


def token_bounds(processor: dict) -> dict:
    """The pixel bounds in image tokens (llama.cpp takes them so), with the patch and merge
    sizes: one image token covers (patch x merge)^2 pixels."""
    area = (processor["patch_size"] * processor["merge_size"]) ** 2
    return {"min_tokens": max(1, processor["min_pixels"] // area), "max_tokens": processor["max_pixels"] // area,
            "patch_size": processor["patch_size"], "merge_size": processor["merge_size"]}


def vision_patches(images, processor: dict) -> list[int]:
    """Patches the vision tower sees per image (before the merger folds merge_size^2 of
    them into one image token), by Qwen's resize rule within the pixel bounds."""
    from PIL import Image

    from blindsight.runtime.images import smart_resize

    factor = processor["patch_size"] * processor["merge_size"]
    counts = []
    for path in images:
        with Image.open(path) as im:
            width, height = im.size
        h, w = smart_resize(height, width, factor, processor["min_pixels"], processor["max_pixels"])
        counts.append((h // processor["patch_size"]) * (w // processor["patch_size"]))
    return counts


def openvino_merger_mask_bytes(patches: list[int]) -> int:
    """OpenVINO GenAI runs Qwen2-VL's vision blocks once over the patches of all images of
    the prompt, with an f32 attention mask [1, N, N] (N = all patches) as the optimum-intel
    export's ``attention_mask`` input: its size grows with the square of the image count."""
    n = sum(patches)
    return 4 * n * n


def chat_template(path: Path) -> str:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json or
    tokenizer_config.json's, as transformers looks for it."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    raise PeersError(f"{path} has no chat template (chat_template.jinja, chat_template.json or in tokenizer_config.json)")
