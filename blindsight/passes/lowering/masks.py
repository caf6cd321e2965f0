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


def position_keep(b: Builder, q_pos: str, k_pos: str, *, causal: bool, window: int) -> str | None:
    """Causality and a sliding window (SPEC §2's mask functions) by absolute
    position, for positions already shaped to broadcast; None if neither applies."""
    fn = model_mask(causal, window)
    if fn is None:
        return None
    return fn(TokenFacts(None, None, q_pos), TokenFacts(None, None, k_pos), OnnxOps(b))


def structural_keep(b: Builder, cfg: AttentionConfig, q_pos: str, k_pos: str) -> str | None:
    """The attributes' causality and window for 1-D query and key positions: bool [Sq, Skv] or None."""
    if model_mask(cfg.is_causal, cfg.local_window_size) is None:
        return None
    return position_keep(b, b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0), causal=cfg.is_causal, window=cfg.local_window_size)
