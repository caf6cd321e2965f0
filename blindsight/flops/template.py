"""The docs/specification.md §6 benchmark prompt template: text, then N images each after a gap, then a question."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Template:
    """docs/specification.md §6 prompt: ``prefix`` text tokens, then N images of ``image_len`` tokens,
    each after ``gap`` text tokens, then a ``question``."""

    num_images: int
    image_len: int
    prefix: int = 24
    gap: int = 8
    question: int = 32

    @property
    def spans(self) -> np.ndarray:
        starts = self.prefix + self.gap + np.arange(self.num_images, dtype=np.int64) * (self.gap + self.image_len)
        return np.stack([starts, starts + self.image_len], axis=1).reshape(-1, 2)

    @property
    def seq_len(self) -> int:
        return self.prefix + self.num_images * (self.gap + self.image_len) + self.question
