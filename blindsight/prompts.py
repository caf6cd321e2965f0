"""Deterministic multi-segment prompts: bs-profile's calibration prompts and bs-eval's task.

A prompt is a list of pieces: text, or a *segment* that stands for an image.
On text-only weights a segment is descriptive text wrapped in the family's
image delimiter tokens (surrogate images); its span covers the delimiters, so
the start delimiter is the sink (docs/specification.md §2). :func:`encode` tokenises a prompt;
:class:`Encoded` is what calibration and evaluation run (real-VLM calibration
prompts, :mod:`blindsight.calibration.vlm_prompts`, produce it too).

The task (:func:`task_prompts`): which colour is the object that one segment
shows? Every prompt holds 4-6 segments; each describes one object of a
distinct colour among neutral filler sentences. The question names the object
of one segment, so the answer is in that segment only. Scoring is multiple
choice over the colours present in the prompt (chance = 1 / number of
segments): the candidate with the highest next-token logit after "Answer: The
<object> is" wins. Calibration and the task draw from separate seed streams.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from blindsight.attention import Delimiters, validate_spans

CALIBRATION_SEED = 1234
TASK_SEED = 2024
TASK_SEGMENTS = (4, 6)

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


@dataclasses.dataclass
class Encoded:
    """One tokenised prompt: ids [S] and its segment spans [N, 2]."""

    ids: np.ndarray
    spans: np.ndarray
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. a VLM processor's pixel inputs

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[0])


@dataclasses.dataclass
class TaskPrompt:
    pieces: list[Piece]
    candidates: list[str]  # answer words, one per segment, in segment order
    answer: int  # index into candidates (= the segment the question is about)

    @property
    def num_segments(self) -> int:
        return len(self.candidates)


def _fillers(rng: random.Random, n: int) -> list[str]:
    """``n`` filler sentences: distinct up to the pool's size (the default prompts' draws), then the
    pool again in fresh orders, for long segments."""
    if n <= len(FILLER):
        return rng.sample(FILLER, n)
    rounds = [rng.sample(FILLER, len(FILLER)) for _ in range(n // len(FILLER) + 1)]
    return [s for r in rounds for s in r][:n]


def filler_for(tokenizer, tokens: int) -> int:
    """Filler sentences that make a segment about ``tokens`` tokens long under ``tokenizer``."""
    per_sentence = float(np.mean([len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER]))
    key = len(tokenizer(" A lantern stands on a wooden table. The lantern is red.", add_special_tokens=False)["input_ids"])
    return max(0, round((tokens - 2 - key) / per_sentence))  # 2: the segment's delimiters


def describe(rng: random.Random, colour: str, obj: str, filler: int) -> str:
    """One segment's text: the key sentences among ``filler`` neutral sentences."""
    key = f"A {obj} stands {rng.choice(PLACES)}. The {obj} is {colour}."
    others = _fillers(rng, filler)
    at = rng.randrange(filler + 1)
    return " ".join(others[:at] + [key] + others[at:])


def _draw(rng: random.Random, segments: tuple[int, int]) -> tuple[int, list[str], list[str]]:
    """A prompt's number of segments and their distinct colours and objects."""
    n = rng.randint(*segments)
    if n <= len(COLOURS):
        return n, rng.sample(COLOURS, n), rng.sample(OBJECTS, n)
    # long calibration prompts: more segments than colours, so they repeat (the task never asks this many)
    return n, [rng.choice(COLOURS) for _ in range(n)], [rng.choice(OBJECTS) for _ in range(n)]


def _pictures(rng: random.Random, n: int, colours, objects, filler: int) -> list[Piece]:
    """The opening line and ``n`` described segments, one per line."""
    pieces = [Piece(f"Here are {n} pictures.\n")]
    for k in range(n):
        pieces.append(Piece(f"Picture {k + 1}: "))
        pieces.append(Piece(describe(rng, colours[k], objects[k], filler), segment=True))
        pieces.append(Piece("\n"))
    return pieces


def calibration_prompts(num_prompts: int, seed: int = CALIBRATION_SEED, segments: tuple[int, int] = (4, 6),
                        filler: int = 4) -> list[list[Piece]]:
    """``num_prompts`` prompts of 4-6 described segments (``segments``, each with ``filler``
    neutral sentences) and a free question (different question forms and seed stream from the task's)."""
    rng = random.Random(f"calibration-{seed}")
    prompts = []
    for _ in range(num_prompts):
        n, colours, objects = _draw(rng, segments)
        pieces = _pictures(rng, n, colours, objects, filler)
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


def task_prompts(num_prompts: int, seed: int = TASK_SEED, segments=TASK_SEGMENTS, filler: int = 4) -> list[TaskPrompt]:
    """``num_prompts`` task prompts: the colour of the object one segment shows."""
    rng = random.Random(f"eval-{seed}")
    out = []
    for _ in range(num_prompts):
        n, colours, objects = _draw(rng, segments)
        target = rng.randrange(n)
        pieces = _pictures(rng, n, colours, objects, filler)
        obj = objects[target]
        pieces.append(Piece(f"Question: What colour is the {obj}?\nAnswer: The {obj} is"))
        out.append(TaskPrompt(pieces, list(colours), target))
    return out


def candidate_token_ids(tokenizer, words) -> list[int]:
    """First token of " word" for each candidate (distinct for the built-in colours)."""
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"candidate answers {words} share a first token under this tokenizer")
    return ids


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
