"""The categorisation rule: recall tables -> one prompt-agnostic category per head.

Per prompt, a head's choice is the sparsest category (``semantics.DENSITY_ORDER``:
dense < intra_sink < intra < sink in sparsity) whose recall reaches the
layer's threshold. Across prompts, a head keeps a sparse category only if that
category or a sparser one was chosen for at least ``min_fraction`` of the
prompts; otherwise it falls back to the next denser category, down to dense.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from blindsight.calibration.recall import RECALL_CATEGORIES
from blindsight.errors import BlindSightError
from blindsight.attention import DENSITY_ORDER

DEFAULT_THRESHOLD = "0.8"
DEFAULT_MIN_FRACTION = 0.75

# recall column of each DENSITY_ORDER entry
_COLUMN = [RECALL_CATEGORIES.index(c) for c in DENSITY_ORDER]


@dataclasses.dataclass(frozen=True)
class ThresholdSchedule:
    """Recall threshold per layer: constant (``first == last``) or linear in depth."""

    first: float
    last: float

    @classmethod
    def parse(cls, text: str | float) -> "ThresholdSchedule":
        """``"0.9"`` (constant) or ``"0.85:0.95"`` (first layer : last layer, linear between)."""
        parts = str(text).split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or not all(0.0 <= v <= 1.0 for v in values):
            raise BlindSightError(
                f"threshold {text!r} is not a recall in [0, 1] or FIRST:LAST (e.g. 0.9 or 0.85:0.95)"
            )
        return cls(values[0], values[-1])

    def for_layers(self, num_layers: int) -> np.ndarray:
        if num_layers == 1:
            return np.array([self.first])
        return self.first + (self.last - self.first) * np.arange(num_layers) / (num_layers - 1)

    def __str__(self) -> str:
        return f"{self.first:g}" if self.first == self.last else f"{self.first:g}:{self.last:g}"


def choose_per_prompt(recalls: np.ndarray, schedule: ThresholdSchedule) -> np.ndarray:
    """recalls [P, L, H, C] (columns in RECALL_CATEGORIES order) -> int [P, L, H]:
    index into DENSITY_ORDER of the sparsest category whose recall >= threshold(layer)."""
    recalls = np.asarray(recalls, dtype=np.float64)
    thr = schedule.for_layers(recalls.shape[1])[None, :, None]
    choice = np.zeros(recalls.shape[:3], dtype=np.int64)  # dense always qualifies
    for idx in range(1, len(DENSITY_ORDER)):
        ok = recalls[..., _COLUMN[idx]] >= thr
        choice = np.where(ok, idx, choice)  # later (sparser) categories win
    return choice


@dataclasses.dataclass
class Categorization:
    layers: list[list[str]]
    choices: np.ndarray  # [P, L, H] per-prompt DENSITY_ORDER indices
    support: np.ndarray  # [L, H] fraction of prompts whose choice was the final category or sparser


def categorize(recalls: np.ndarray, schedule: ThresholdSchedule | str | float, min_fraction: float) -> Categorization:
    """Prompt-agnostic categories [L][H] from per-prompt recalls [P, L, H, C]."""
    if not isinstance(schedule, ThresholdSchedule):
        schedule = ThresholdSchedule.parse(schedule)
    if not 0.0 < min_fraction <= 1.0:
        raise BlindSightError(f"min-fraction {min_fraction!r} must be in (0, 1]")
    choices = choose_per_prompt(recalls, schedule)
    final = np.zeros(choices.shape[1:], dtype=np.int64)
    support = np.ones(choices.shape[1:])
    # densest-to-sparsest scan: each qualifying sparser category overrides
    for idx in range(1, len(DENSITY_ORDER)):
        frac = (choices >= idx).mean(axis=0)
        ok = frac >= min_fraction - 1e-12
        final = np.where(ok, idx, final)
        support = np.where(ok, frac, support)
    layers = [[DENSITY_ORDER[i] for i in row] for row in final.tolist()]
    return Categorization(layers, choices, support)
