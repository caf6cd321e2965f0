"""Deterministic multi-segment prompts for calibration (and the pieces bs-eval reuses).

A prompt is a list of pieces: text, or a *segment* that stands for an image.
On text-only weights a segment is descriptive text wrapped in the family's
image delimiter tokens (surrogate images); its span covers the delimiters, so
the start delimiter is the sink (SPEC §2).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from blindsight.attention import Delimiters, validate_spans

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink")
OBJECTS = (
    "lantern", "bicycle", "teapot", "umbrella", "kite", "boat", "chair", "guitar", "clock", "vase",
    "backpack", "car", "mug", "hat", "lamp", "bucket", "ball", "book", "door", "scarf",
)
PLACES = (
    "on a wooden table", "next to a stone wall", "in a small garden", "on a sandy beach",
    "beside a window", "in a busy market", "on a quiet street", "under a tall tree",
    "in an empty room", "near a river bank", "on a shelf", "in a snowy field",
)
# neutral filler: no colours, no objects, so a question's answer lives in one sentence only
FILLER = (
    "The light comes from the left side of the frame.",
    "The picture was taken in the late afternoon.",
    "A few shadows fall across the ground.",
    "The background is slightly out of focus.",
    "Nothing else in the scene draws attention.",
    "The air looks still and the weather is calm.",
    "The photo is sharp and well exposed.",
    "There are no people anywhere in the picture.",
    "The camera was held at eye level.",
    "Some texture is visible on the surfaces nearby.",
    "The edges of the frame are a little darker.",
    "It seems to be a quiet moment of the day.",
)


@dataclasses.dataclass
class Piece:
    text: str
    segment: bool = False  # True: a surrogate image


def describe(rng: random.Random, colour: str, obj: str, filler: int) -> str:
    """One segment's text: the key sentences among ``filler`` neutral sentences."""
    key = f"A {obj} stands {rng.choice(PLACES)}. The {obj} is {colour}."
    others = rng.sample(FILLER, filler)
    at = rng.randrange(filler + 1)
    return " ".join(others[:at] + [key] + others[at:])


def calibration_prompts(num_prompts: int, seed: int = 1234, segments: tuple[int, int] = (4, 6), filler: int = 4):
    """``num_prompts`` prompts of 4-6 described segments and a free question
    (different question forms and seed stream from bs-eval's task)."""
    rng = random.Random(f"calibration-{seed}")
    prompts = []
    for _ in range(num_prompts):
        n = rng.randint(*segments)
        colours = rng.sample(COLOURS, n)
        objects = rng.sample(OBJECTS, n)
        pieces = [Piece(f"Here are {n} pictures.\n")]
        for k in range(n):
            pieces.append(Piece(f"Picture {k + 1}: "))
            pieces.append(Piece(describe(rng, colours[k], objects[k], filler), segment=True))
            pieces.append(Piece("\n"))
        ask = rng.choice(
            [
                "Describe what the pictures have in common.",
                f"Which picture shows the {objects[rng.randrange(n)]}?",
                "Compare the first and the last picture.",
                f"Where is the {objects[rng.randrange(n)]} in these pictures?",
            ]
        )
        pieces.append(Piece(f"Question: {ask}\nAnswer:"))
        prompts.append(pieces)
    return prompts


def encode(pieces: list[Piece], tokenizer, delimiters: Delimiters) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (with the tokenizer's BOS, if it adds one) and the segments' spans [N, 2]."""
    ids: list[int] = []
    spans = []
    for i, piece in enumerate(pieces):
        toks = tokenizer(piece.text, add_special_tokens=(i == 0))["input_ids"]
        if piece.segment:
            start = len(ids)
            ids.extend([delimiters.start, *toks, delimiters.end])
            spans.append((start, len(ids)))
        else:
            ids.extend(toks)
    arr = np.asarray(ids, dtype=np.int64)
    return arr, validate_spans(spans, len(arr))
