"""Tiny random-weight configurations for the supported VLM language-model families.

Only the *language model* prefill is of interest here; the vision towers of the
qwen configs are kept as small as possible so that building the full
``*ForConditionalGeneration`` model stays cheap. The shared text dimensions
are data of :mod:`blindsight.configs`; each family's part is its registry
entry's ``tiny_config`` (:mod:`blindsight.families`).
"""

from __future__ import annotations

from typing import Any

from blindsight import families
from blindsight.configs import TINY_HEADS, TINY_HIDDEN, TINY_INTERMEDIATE, TINY_VOCAB
from blindsight.families import FAMILIES  # noqa: F401 (re-exported)


def _text_kwargs(num_kv_heads: int, num_layers: int) -> dict[str, Any]:
    if TINY_HEADS % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_attention_heads={TINY_HEADS}")
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
    )


def tiny_config(family: str, *, num_kv_heads: int = 2, num_layers: int = 2, seed: int = 0):
    """Return a tiny transformers config for ``family``.

    * ``qwen2_vl`` / ``qwen2_5_vl``: the full VLM config (``Qwen2VLConfig`` /
      ``Qwen2_5_VLConfig``) with a tiny text and vision part.
    * ``gemma3``: a ``Gemma3TextConfig`` whose layers are all sliding-window
      layers (window ``TINY_SLIDING_WINDOW``) except the last one, which is a
      full-attention layer.

    ``num_kv_heads`` < 4 gives grouped-query attention, ``num_kv_heads=4`` plain
    multi-head attention.  ``seed`` is stored on the config (``_blindsight_seed``)
    and used by :func:`blindsight.models.export.load_language_model` to seed the
    random weight initialisation.
    """
    spec = families.get(family)
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    cfg = spec.tiny_config(spec, _text_kwargs(num_kv_heads, num_layers))
    cfg._blindsight_seed = int(seed)
    return cfg
