"""Recall of a head for a category: attention mass kept by the category's mask.

For one layer's attention probabilities ``p`` [H, S, S] (rows sum to 1 under
the model's own mask), the recall of head h for category c is the mean over
image-token query rows q of sum_k p[h, q, k] * allowed_c[q, k]. Allowed keys
come from :func:`blindsight.attention.allowed_mask`, never from here.
"""

from __future__ import annotations

import numpy as np

from blindsight.attention import CATEGORIES, allowed_mask, token_facts

# recall columns, sparsest last (as semantics.DENSITY_ORDER lists them)
RECALL_CATEGORIES = CATEGORIES


def image_rows(spans, seq_len: int) -> np.ndarray:
    """Positions of image tokens (the query rows recall averages over)."""
    image, _ = token_facts(spans, seq_len)
    return np.flatnonzero(image >= 0)


def category_masks(spans, seq_len: int, sink_tokens: int = 1, image_blocks: bool = False) -> dict[str, np.ndarray]:
    """Boolean [R, S] allowed keys of each category, restricted to the image query rows R
    (``image_blocks``: the model's mask has Gemma 3's bidirectional image blocks)."""
    rows = image_rows(spans, seq_len)
    return {c: allowed_mask(c, spans, seq_len, sink_tokens=sink_tokens, image_blocks=image_blocks)[rows]
            for c in RECALL_CATEGORIES}


def head_recalls(probs, spans, seq_len: int | None = None, sink_tokens: int = 1, masks=None,
                 image_blocks: bool = False) -> np.ndarray:
    """float64 [H, len(RECALL_CATEGORIES)] recalls of one layer's probabilities [H, S, S].

    ``probs`` may be numpy or a torch tensor (reduced in torch, then copied);
    ``masks`` may be passed in from :func:`category_masks` to reuse across layers.
    With no image token every recall is 1 (every category equals dense).
    """
    seq_len = probs.shape[-1] if seq_len is None else seq_len
    rows = image_rows(spans, seq_len)
    if rows.size == 0:
        return np.ones((probs.shape[0], len(RECALL_CATEGORIES)))
    masks = category_masks(spans, seq_len, sink_tokens, image_blocks) if masks is None else masks
    out = np.empty((probs.shape[0], len(RECALL_CATEGORIES)))
    if isinstance(probs, np.ndarray):
        for h in range(probs.shape[0]):  # one head at a time: [R, S] temporaries only
            sel = probs[h, rows, :].astype(np.float64)
            out[h] = [(sel * masks[c]).sum(-1).mean() for c in RECALL_CATEGORIES]
        return out
    import torch

    trows = torch.from_numpy(rows)
    tmasks = [torch.from_numpy(masks[c]) for c in RECALL_CATEGORIES]
    for h in range(probs.shape[0]):
        sel = probs[h].index_select(0, trows).to(torch.float64)
        out[h] = [float((sel * m).sum(-1).mean()) for m in tmasks]
    return out
