"""Model dimensions, as data: the tiny random models' text dimensions, and the
whole VLM configurations (text and vision) of public checkpoints, one JSON file
each, from their published config.json.

A packaged file holds ``family`` (a :mod:`blindsight.families` name), ``top``
(fields of the VLM config itself), ``text_config`` and ``vision_config``: what
the full-size random checkpoints of :mod:`blindsight.models.fullsize` are made
from; :func:`transformers_dict` gives the same configuration in the shape of a
transformers config.json (bs-flops' built-in models, :mod:`blindsight.flops`).

Imports nothing of BlindSight but its errors: the family registry and the
model builders above read it.
"""

from __future__ import annotations

import json
from importlib import resources

from blindsight.errors import BlindSightError

# Tiny text dimensions shared by all families (blindsight.models.configs.tiny_config).
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_VOCAB = 128
TINY_INTERMEDIATE = 128
TINY_SLIDING_WINDOW = 8
# mrope_section must sum to head_dim // 2 (it splits the rotary frequencies).
TINY_MROPE_SECTION = [2, 3, 3]


def names() -> list[str]:
    """The packaged configurations, sorted."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict:
    """The packaged configuration ``name`` (family, top, text_config, vision_config)."""
    if name not in names():
        raise BlindSightError(f"unknown configuration {name!r}; expected one of {', '.join(names())}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())


def transformers_dict(name: str) -> dict:
    """The packaged configuration ``name`` shaped as a transformers VLM config.json:
    ``model_type`` (the family), the top-level fields, ``text_config``, ``vision_config``."""
    spec = load(name)
    return {"model_type": spec["family"], **spec["top"], "text_config": dict(spec["text_config"]),
            "vision_config": dict(spec["vision_config"])}
