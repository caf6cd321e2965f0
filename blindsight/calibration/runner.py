"""bs-profile as a function: run the model over calibration prompts, reduce each
layer's attention to per-head recalls at once, categorise, build the profile."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from blindsight.calibration.categorize import (
    DEFAULT_MIN_FRACTION,
    DEFAULT_THRESHOLD,
    Categorization,
    ThresholdSchedule,
    categorize,
)
from blindsight.calibration.hooks import decoder_attentions, hooked
from blindsight.calibration.recall import RECALL_CATEGORIES, category_masks, head_recalls
from blindsight.calibration.vlm_prompts import vlm_calibration_prompts
from blindsight.models import pretrained
from blindsight.models.image_blocks import prompt_masks
from blindsight.records import scrub
from blindsight.profile import Profile
from blindsight.flops import Template
from blindsight.prompts import CALIBRATION_SEED, Encoded, calibration_prompts, encode, filler_for

DEFAULT_PROMPTS = 16
DEFAULT_SEED = CALIBRATION_SEED


@dataclasses.dataclass
class CalibrationResult:
    profile: Profile
    recalls: np.ndarray  # [P, L, H, C] per-prompt recalls, columns RECALL_CATEGORIES
    categorization: Categorization
    prompts: list[Encoded]
    loaded: pretrained.LoadedModel


def text_dims(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads


def forward(loaded: pretrained.LoadedModel, prompt: Encoded):
    """One prefill; returns the last position's logits [V] (float32). Gemma 3
    attends within its (surrogate) images both ways: the VLM from the
    processor's token_type_ids, a text-only model through the same masks
    (none under the causal surrogate mask)."""
    ids = torch.from_numpy(prompt.ids)[None]
    kwargs = dict(prompt.extra)
    if loaded.image_blocks and "token_type_ids" not in kwargs:
        kwargs["attention_mask"] = prompt_masks(loaded.model, prompt.spans, prompt.seq_len)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
    return out.logits[0, -1].float()


def prompt_recalls(loaded: pretrained.LoadedModel, prompt: Encoded, sink_tokens: int = 1) -> np.ndarray:
    """[L, H, C] recalls of one prompt; each layer's probabilities are reduced as soon as they exist."""
    num_layers, num_heads, _ = text_dims(loaded.model)
    out = np.full((num_layers, num_heads, len(RECALL_CATEGORIES)), np.nan)
    masks = category_masks(prompt.spans, prompt.seq_len, sink_tokens, image_blocks=loaded.image_blocks)

    def observe(layer, probs):
        out[layer] = head_recalls(probs, prompt.spans, prompt.seq_len, sink_tokens, masks=masks)

    with hooked(loaded.model, observe=observe):
        forward(loaded, prompt)
    if np.isnan(out).any():
        raise RuntimeError("some decoder layers reported no attention probabilities")
    return out


def encode_calibration(loaded: pretrained.LoadedModel, num_prompts: int, seed: int,
                       shape: Template | None = None) -> list[Encoded]:
    """The calibration prompts; ``shape`` (IMAGES:TOKENS) fixes the images per prompt and their
    length (e.g. the long prompts a deployment sees) instead of the default 3-6 short ones."""
    if loaded.surrogate:
        kwargs = {}
        if shape is not None:
            kwargs = dict(segments=(shape.num_images, shape.num_images), filler=filler_for(loaded.tokenizer, shape.image_len))
        return [
            Encoded(*encode(p, loaded.tokenizer, loaded.delimiters))
            for p in calibration_prompts(num_prompts, seed, **kwargs)
        ]
    if shape is None:
        return vlm_calibration_prompts(loaded, num_prompts, seed)
    return vlm_calibration_prompts(loaded, num_prompts, seed, images=(shape.num_images, shape.num_images),
                                   image_tokens=shape.image_len)


def calibrate(
    model: str | pretrained.LoadedModel = pretrained.DEFAULT_MODEL,
    *,
    num_prompts: int = DEFAULT_PROMPTS,
    seed: int = DEFAULT_SEED,
    threshold: str | float | ThresholdSchedule = DEFAULT_THRESHOLD,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    sink_tokens: int = 1,
    progress: bool = True,
    mask: str = "image",
    shape: Template | None = None,
) -> CalibrationResult:
    """Calibrate a model (short name, directory or :class:`LoadedModel`) into a profile;
    ``mask`` as :func:`pretrained.load` (a loaded model keeps its own)."""
    schedule = threshold if isinstance(threshold, ThresholdSchedule) else ThresholdSchedule.parse(threshold)
    loaded = model if isinstance(model, pretrained.LoadedModel) else pretrained.load(model, mask=mask)
    prompts = encode_calibration(loaded, num_prompts, seed, shape)
    recalls = np.stack(
        [
            prompt_recalls(loaded, p, sink_tokens)
            for p in tqdm(prompts, desc="calibrating", unit="prompt", disable=not progress)
        ]
    )
    cat = categorize(recalls, schedule, min_fraction)
    profile = build_profile(loaded, cat, recalls, schedule, min_fraction, prompts, seed, sink_tokens)
    return CalibrationResult(profile, recalls, cat, prompts, loaded)


def build_profile(loaded, cat: Categorization, recalls, schedule, min_fraction, prompts, seed, sink_tokens) -> Profile:
    _, _, num_kv = text_dims(loaded.model)
    lengths = [p.seq_len for p in prompts]
    calibration = {
        "method": "per-head recall of each category's allowed keys, mean over image-token query rows; "
        "per prompt the sparsest category with recall >= threshold(layer); across prompts a sparse "
        "category needs at least min_fraction of the prompts, else the next denser one",
        "images": pretrained.SURROGATE_NOTE if loaded.surrogate else "real images through the model's processor",
        "mask": loaded.mask_description,
        "threshold": str(schedule),
        "threshold_per_layer": [round(float(t), 6) for t in schedule.for_layers(recalls.shape[1])],
        "min_fraction": min_fraction,
        "num_prompts": len(prompts),
        "seed": seed,
        "prompt_tokens": {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
        "images_per_prompt": {"min": min(len(p.spans) for p in prompts), "max": max(len(p.spans) for p in prompts)},
        "tokens_per_image": {"min": min(int(e - s) for p in prompts for s, e in p.spans),
                             "max": max(int(e - s) for p in prompts for s, e in p.spans)},
        "recall_columns": list(RECALL_CATEGORIES),
        "mean_recall": np.round(recalls.mean(axis=0), 5).tolist(),
        "min_recall": np.round(recalls.min(axis=0), 5).tolist(),
        "support": np.round(cat.support, 4).tolist(),
    }
    return Profile(
        cat.layers,
        num_kv_heads=num_kv,
        sink_tokens=sink_tokens,
        model=scrub(loaded.describe()),
        calibration=calibration,
    )
