"""Gemma 3's bidirectional image blocks in the exported graphs (torch side).

transformers' Gemma 3 builds them from ``token_type_ids`` (1 on an image's
soft tokens) only in ``Gemma3Model``/``Gemma3ForConditionalGeneration``; the
text decoder the exports trace takes a prepared mask mapping instead. So the
export wrappers take ``token_type_ids`` as a graph input and build that
mapping with transformers' own function, which keeps the graph's mask equal
to what transformers computes (causal or same block, then the window, then
padding). With a KV cache the past positions belong to no block: a block is
bidirectional only within the chunk that holds all of it (the runtime refuses
chunks that split one).
"""

from __future__ import annotations

import torch

from blindsight.attention.schema import TOKEN_TYPE_INPUT  # noqa: F401 (re-exported for the exporters)


def block_sequence_ids(token_type_ids: torch.Tensor, past_length) -> torch.Tensor:
    """[B, past + S] block ids for absolute positions (-1: no block), as
    transformers' ``get_block_sequence_ids_for_mask`` numbers the runs of 1s."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    ids = get_block_sequence_ids_for_mask(token_type_ids)
    past = torch.full((ids.shape[0], past_length), -1, dtype=ids.dtype, device=ids.device)
    return torch.cat([past, ids], dim=1)


def mask_mapping(config, inputs_embeds, attention_mask, past_key_values, position_ids, token_type_ids, past_length=0):
    """The decoder's ``attention_mask`` mapping (full and sliding layers) with the image blocks."""
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

    return create_masks_for_vision_model(
        config, inputs_embeds, attention_mask, past_key_values, position_ids,
        block_sequence_ids(token_type_ids, past_length),
    )


def prompt_masks(model, spans, seq_len: int):
    """The mask mapping a text-only Gemma 3 (``Gemma3ForCausalLM``, whose forward
    takes no ``token_type_ids``) needs to attend to a prompt's (surrogate) images
    as the VLM does: pass it as ``attention_mask``. Built with the model's current
    attention implementation, so call it where the model will run."""
    from blindsight.attention.spans import token_type_ids

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape_only = torch.zeros(1, seq_len, 1, dtype=model.dtype)  # the mask builders read batch, length, dtype
    types = torch.from_numpy(token_type_ids(spans, seq_len, rows=1))
    return mask_mapping(config, shape_only, None, None, torch.arange(seq_len)[None], types)
