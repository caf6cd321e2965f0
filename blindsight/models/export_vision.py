"""Export the vision encoder and the token embedding of a VLM.

Qwen2-VL / Qwen2.5-VL vision towers derive index tensors from
``image_grid_thw`` with Python loops (per-image rotary positions, attention
segments, Qwen2.5-VL's window order), which no trace can keep dynamic.
transformers exposes them as precomputable (``transformers.vision_utils``),
so the graph takes them as inputs and :func:`qwen_vision_feeds` computes them
on the host (numpy equivalents of transformers' functions, in
blindsight.vision_inputs, so the runtime needs no torch). Attention inside the tower runs
over all patches of the call with a block-diagonal mask made from the segment
boundaries (exact; memory grows with the square of the patches of one call,
so feed images one at a time when they are large).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blindsight import families
from blindsight.passes.fused_attention import fuse_attention
from blindsight.passes.query_chunks import DEFAULT_ROWS, chunk_attention_queries

from .dtype import cast_floats, vision_opset
from .export import _quiet, _save

# A name with "flash" in it makes the Qwen vision attention pass cu_seqlens to
# the attention function instead of splitting the patches per image in Python.
SEGMENT_ATTENTION = "flash_blindsight_segments"

def _segment_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                       cu_seq_lens_q=None, **_):
    """Packed-sequence attention: patches attend within their own segment."""
    pos = torch.arange(query.shape[2], device=query.device)
    seg = (pos[:, None] >= cu_seq_lens_q[None, 1:].to(pos.dtype)).sum(-1)
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)


class QwenVision(nn.Module):
    """``forward(pixel_values, vision_position_ids, cu_seqlens[, window_index, cu_window_seqlens])
    -> image_features [num_image_tokens, hidden]``."""

    def __init__(self, visual: nn.Module, windowed: bool):
        super().__init__()
        self.visual = visual
        self.windowed = windowed

    def forward(self, pixel_values, vision_position_ids, cu_seqlens, window_index=None, cu_window_seqlens=None):
        kwargs = dict(position_ids=vision_position_ids, cu_seqlens=cu_seqlens, max_seqlen=0)
        if self.windowed:
            kwargs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_window_seqlen=0)
        out = self.visual(pixel_values, grid_thw=None, **kwargs)
        return out.pooler_output


class GemmaVision(nn.Module):
    """``forward(pixel_values [N, 3, H, W]) -> image_features [N, tokens_per_image, hidden]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output


class Embed(nn.Module):
    """``forward(input_ids) -> inputs_embeds`` (Gemma's sqrt(hidden) scale is part of its embedding)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


def qwen_vision_feeds(family: str, vision_config: dict, pixel_values, image_grid_thw) -> dict[str, np.ndarray]:
    """Every input of a Qwen ``vision.onnx`` from the processor's outputs.

    ``vision_config`` is template.json's ``vision`` entry (spatial_merge_size,
    window_size, patch_size). The numpy implementation of the runtime
    (:mod:`blindsight.vision_inputs`, equal to transformers.vision_utils').
    """
    from blindsight.vision_inputs import qwen_vision_feeds as feeds

    return feeds(family, vision_config, pixel_values, image_grid_thw)


def qwen_vision_module(family: str, model: nn.Module) -> QwenVision:
    _register_segment_attention()
    visual = model.model.visual
    visual.config._attn_implementation = SEGMENT_ATTENTION
    return QwenVision(visual, windowed=families.get(family).windowed_vision).eval()


def export_vision(family: str, model: nn.Module, out_path, example: dict[str, np.ndarray] | None = None,
                  query_rows: int | None = DEFAULT_ROWS, fused: bool = True) -> Path:
    """Write the vision encoder of ``model`` to ``out_path``.

    ``example`` (Qwen) holds tracing inputs as :func:`qwen_vision_feeds` returns them.
    ``pixel_values`` and ``image_features`` take the dtype of the model's weights.
    ``query_rows``: every attention runs that many queries at a time
    (:mod:`blindsight.passes.query_chunks`), so a call holds scores of rows x
    patches, not patches x patches (None: as exported). ``fused`` (with
    ``query_rows``): where a call's mask keeps every key (one image per call), the
    attention runs on ONNX Runtime's fused MultiHeadAttention instead
    (:mod:`blindsight.passes.fused_attention`); the chunks stay as its fallback.
    """
    path = Path(out_path)
    spec = families.get(family)
    if spec.vision_tower == families.SIGLIP_VISION:
        vcfg = model.config.vision_config
        module = GemmaVision(model.model).eval()
        args = (torch.randn(2, vcfg.num_channels, vcfg.image_size, vcfg.image_size),)
        names = ["pixel_values"]
        dynamic = ({0: torch.export.Dim("num_images", min=1, max=1024)},)
    else:
        module = qwen_vision_module(family, model)
        names = list(spec.vision_inputs)
        args = tuple(torch.from_numpy(example[n]) for n in names)
        patches = torch.export.Dim("num_patches", min=4, max=1 << 20)
        segments = torch.export.Dim("num_segments_plus_1", min=2, max=1 << 14)
        dynamic = [{0: patches}, {0: patches}, {0: segments}]
        if spec.windowed_vision:
            dynamic += [{0: torch.export.Dim("num_merged", min=1, max=1 << 18)},
                        {0: torch.export.Dim("num_windows_plus_1", min=2, max=1 << 16)}]
        dynamic = tuple(dynamic)
    args = cast_floats(args, model.dtype)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=names, output_names=["image_features"],
            dynamic_shapes=dynamic, optimize=True, report=False, verbose=False, **vision_opset(model.dtype),
        )
    if query_rows and fused:
        fuse_attention(program.model, query_rows)
    elif query_rows:
        chunk_attention_queries(program.model, query_rows)
    _save(program, path)
    return path


EMBED_EXTERNAL_BYTES = 64 << 20


def export_embed(model: nn.Module, out_path) -> Path:
    path = Path(out_path)
    module = Embed(model.get_input_embeddings()).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq_len", min=1, max=1 << 18)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, (torch.zeros(1, 3, dtype=torch.int64),), dynamo=True, input_names=["input_ids"],
            output_names=["inputs_embeds"], dynamic_shapes=({0: batch, 1: seq},),
            optimize=True, report=False, verbose=False,
        )
    # a real vocabulary's table goes to external data: ONNX Runtime maps the file, so a
    # prompt pages in the rows of its tokens only instead of holding the whole table
    # (0.93 GB at Qwen2-VL-2B fp32) in the process
    _save(program, path, external_from=EMBED_EXTERNAL_BYTES)
    return path
