"""The multi-segment task: which colour is the object that one segment shows?

Every prompt holds 4-6 segments (surrogate images on text-only weights); each
describes one object of a distinct colour among neutral filler sentences. The
question names the object of one segment, so the answer is in that segment
only. Scoring is multiple choice over the colours present in the prompt
(chance = 1 / number of segments): the candidate with the highest next-token
logit after "Answer: The <object> is" wins. Built deterministically from a seed,
with a seed stream separate from calibration's.
"""

from __future__ import annotations

import dataclasses
import random

from blindsight.calibration.prompts import COLOURS, OBJECTS, Piece, describe

DEFAULT_SEED = 2024
DEFAULT_SEGMENTS = (4, 6)


@dataclasses.dataclass
class TaskPrompt:
    pieces: list[Piece]
    candidates: list[str]  # answer words, one per segment, in segment order
    answer: int  # index into candidates (= the segment the question is about)

    @property
    def num_segments(self) -> int:
        return len(self.candidates)


def task_prompts(num_prompts: int, seed: int = DEFAULT_SEED, segments=DEFAULT_SEGMENTS, filler: int = 4) -> list[TaskPrompt]:
    rng = random.Random(f"eval-{seed}")
    out = []
    for _ in range(num_prompts):
        n = rng.randint(*segments)
        colours = rng.sample(COLOURS, n)
        objects = rng.sample(OBJECTS, n)
        target = rng.randrange(n)
        pieces = [Piece(f"Here are {n} pictures.\n")]
        for k in range(n):
            pieces.append(Piece(f"Picture {k + 1}: "))
            pieces.append(Piece(describe(rng, colours[k], objects[k], filler), segment=True))
            pieces.append(Piece("\n"))
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
