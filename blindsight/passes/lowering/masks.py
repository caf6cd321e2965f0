"""The model's own mask inside a function body: the ``attn_mask`` input as a
keep mask or an additive bias, and causality / window from the attributes."""

from __future__ import annotations


from blindsight.attention import TokenFacts, model_mask
from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.builder import Builder
from blindsight.passes.lowering.facts import OnnxOps


def keep_mask(b: Builder, cfg: AttentionConfig, mask: str) -> str:
    """The model's mask as bool (True keeps); float masks keep entries > -inf/2."""
    if cfg.mask_type == "bool":
        return mask
    return b.op("Greater", mask, b.float(b.finite_min()))


def position_keep(b: Builder, q_pos: str, k_pos: str, *, causal: bool, window: int,
                  blocks: tuple[str, str] | None = None) -> str | None:
    """Causality and a sliding window (docs/specification.md §2's mask functions) by absolute
    position, for positions already shaped to broadcast; with ``blocks`` (the
    query's and key's image-block ids, shaped alike) causality admits the same
    image block (Gemma 3). None if nothing applies."""
    fn = model_mask(causal, window, image_blocks=blocks is not None)
    if fn is None:
        return None
    qb, kb = blocks if blocks is not None else (None, None)
    return fn(TokenFacts(None, None, q_pos, qb), TokenFacts(None, None, k_pos, kb), OnnxOps(b))


def structural_keep(b: Builder, cfg: AttentionConfig, q_pos: str, k_pos: str, block: str | None = None) -> str | None:
    """The attributes' causality, image blocks (``block``: int64 block id of
    every key position, needed when ``cfg.image_blocks``) and window for 1-D
    query and key positions: bool [Sq, Skv] or None."""
    if model_mask(cfg.is_causal, cfg.local_window_size) is None:
        return None
    blocks = None
    if cfg.image_blocks and cfg.is_causal:
        blocks = (b.unsqueeze(b.gather(block, q_pos, 0), 1), b.unsqueeze(block, 0))
    return position_keep(b, b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0), causal=cfg.is_causal,
                         window=cfg.local_window_size, blocks=blocks)
