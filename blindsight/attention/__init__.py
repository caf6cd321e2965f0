"""Everything BlindSight means by attention, in one place.

- :mod:`~blindsight.attention.semantics`: the categories' rule table and the
  mask functions (causal, sliding window, and/or combinators), docs/specification.md §2;
- :mod:`~blindsight.attention.spans`: image spans, token facts, spans from ids;
- :mod:`~blindsight.attention.reference`: the numpy reference;
- :mod:`~blindsight.attention.pairs`: allowed-pair counts (FLOPs) in closed form;
- :mod:`~blindsight.attention.schema`: the ``BlindSightAttention`` op's schema.

Nothing here imports onnx, onnxruntime or torch at import time.
"""

from blindsight.attention.pairs import attention_pairs, visible_classes
from blindsight.attention.reference import allowed_mask, allowed_pairs, head_masks, reference_attention
from blindsight.attention.semantics import (
    CATEGORIES,
    DENSITY_ORDER,
    RULES,
    Clause,
    NumpyOps,
    TokenFacts,
    and_masks,
    category_mask,
    category_mask_fn,
    causal,
    is_dense,
    key_only_mask,
    model_mask,
    or_masks,
    sees_own_image,
    sliding_window,
)
from blindsight.attention.spans import Delimiters, find_spans, token_facts, validate_spans

__all__ = [
    "CATEGORIES", "DENSITY_ORDER", "RULES", "Clause", "Delimiters", "NumpyOps", "TokenFacts",
    "allowed_mask", "allowed_pairs", "and_masks", "attention_pairs", "category_mask", "category_mask_fn",
    "causal", "find_spans", "head_masks", "is_dense", "key_only_mask", "model_mask", "or_masks",
    "reference_attention", "sees_own_image", "sliding_window", "token_facts", "validate_spans",
    "visible_classes",
]
