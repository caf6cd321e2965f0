"""Intercept the decoder's attention in transformers, one layer at a time.

Registers one attention implementation, ``blindsight_hook``, with
transformers' ``AttentionInterface`` (and the eager mask builder for it). It
runs the model's own eager attention and hands each decoder layer's
probabilities to the active handler, which reduces them at once (calibration)
or it applies per-head category masks first (the threshold sweep). Nothing
keeps more than one layer's S x S maps: ``output_attentions`` is never used.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import numpy as np
import torch

from blindsight.attention import head_masks

IMPL = "blindsight_hook"

_active: dict = {}


def _eager_of(module):
    return sys.modules[type(module).__module__].eager_attention_forward


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    layer = _active.get("layers", {}).get(id(module))
    eager = _eager_of(module)
    if layer is None:  # not a decoder layer (a vision tower): plain eager attention
        out, _ = eager(module, query, key, value, attention_mask, **kwargs)
        return out, None
    masker = _active.get("mask")
    if masker is not None:
        attention_mask = masker(layer, attention_mask, query.shape[1], query.shape[2], key.shape[2])
    out, probs = eager(module, query, key, value, attention_mask, **kwargs)
    observer = _active.get("observe")
    if observer is not None:
        observer(layer, probs[0].detach())  # batch of one prompt: [H, S, S]
    return out, None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPL, _dispatch)
    AttentionMaskInterface.register(IMPL, eager_mask)


_register()


def decoder_attentions(model) -> list:
    """The decoder's self-attention modules in layer order (profile layer L = index L)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    decoder = getattr(decoder, "language_model", decoder)
    return [layer.self_attn for layer in decoder.layers]


@contextlib.contextmanager
def hooked(model, observe: Callable | None = None, mask: Callable | None = None):
    """Within the block, the model's attention calls ``observe(layer, probs[H,S,S])``
    and/or applies ``mask(layer, model_mask, H, Sq, Skv) -> model_mask``."""
    previous = model.config._attn_implementation
    layers = {id(m): i for i, m in enumerate(decoder_attentions(model))}
    _active.clear()
    _active.update(layers=layers, observe=observe, mask=mask)
    model.set_attn_implementation(IMPL)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _active.clear()


def category_masker(layers: list[list[str]], spans, seq_len: int, sink_tokens: int = 1):
    """A ``mask`` callback that keeps only each head's allowed keys (docs/specification.md §2) on top of
    the model's additive mask, which carries causality (and Gemma 3's image
    blocks); masks are built once per distinct layer."""
    cache: dict = {}

    def mask(layer, model_mask, num_heads, q_len, kv_len):
        cats = tuple(layers[layer])
        key = (cats, model_mask is None)
        if key not in cache:
            allowed = head_masks(cats, spans, q_len, kv_len, sink_tokens, causal=model_mask is None)
            cache[key] = torch.from_numpy(np.ascontiguousarray(allowed))[None]  # [1, H, Sq, Skv]
        allowed = cache[key]
        base = model_mask[..., :kv_len] if model_mask is not None else torch.zeros((1, 1, q_len, kv_len))
        low = torch.finfo(base.dtype).min
        return torch.where(allowed, base, torch.tensor(low, dtype=base.dtype))

    return mask
