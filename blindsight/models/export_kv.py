"""Export a VLM's language model with a KV cache: prefill and decode in one graph.

Graph interface (names as in the export-directory contract, docs/export-contract.md)::

    inputs_embeds                 float [B, S, hidden]
    position_ids                  int64 [3, B, S] (qwen M-RoPE) / [B, S] (gemma3)
    attention_mask                int64 [B, past + S]  (1 = keep, 0 = padding)
    past_key_values.{i}.key/value float [B, num_kv_heads, past, head_dim]
    token_type_ids                int64 [B, S]  (gemma3 only: 1 on the chunk's image soft tokens)
    -> logits                     float [B, 1, vocab] (``logits="last"``, the default: the chunk's
                                  last position) or [B, S, vocab] (``logits="all"``)
    -> present.{i}.key/value      float [B, num_kv_heads, past + S, head_dim]

"float" is the dtype of the model's weights (float32 unless it was cast).

A prefill is a call with past = 0. Generation needs the logits of the last
position only: with ``logits="last"`` the LM head runs on that position alone
(at 32K tokens and a 152K vocabulary, every position's logits would be 19 GB
in fp32 and a tenth of the prefill's FLOPs). For right-padded batches, whose
rows end at different positions, export with ``logits="all"``. Attention is exported in eager form
(MatMul, Mul(scale), Add(mask), Softmax, MatMul), which bs-compile rewrites
with K and V = Concat(past, new) as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blindsight import families

from .dtype import cast_floats
from .export import _logit_softcapping, _quiet, _save, _text_config, _uses_3d_positions
from .image_blocks import TOKEN_TYPE_INPUT, mask_mapping

#: which positions the LM head runs on: the chunk's last one, or every one
LOGITS = ("last", "all")


def check_logits(logits: str) -> str:
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
    return logits


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class LanguageModelWithCache(nn.Module):
    """``forward(inputs_embeds, position_ids, attention_mask, past) -> (logits, *presents)``.

    ``past`` is a tuple of 2 * num_layers tensors (key, value per layer). The
    cache is plain full-length layers for every layer, sliding ones included:
    the sliding window is applied by the mask on absolute positions, so the
    present tensors always hold the whole sequence (what the runtime feeds back).
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, num_layers: int, final_logit_softcapping=None,
                 logits: str = "last"):
        super().__init__()
        self.logits = check_logits(logits)
        self.decoder = decoder
        self.lm_head = lm_head
        self.num_layers = num_layers
        self.final_logit_softcapping = final_logit_softcapping

    def forward(self, inputs_embeds, position_ids, attention_mask, past, token_type_ids=None):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        if token_type_ids is not None:  # Gemma 3: bidirectional image blocks within the chunk
            attention_mask = mask_mapping(self.decoder.config, inputs_embeds, attention_mask, cache, position_ids,
                                          token_type_ids, past_length=past[0].shape[2])
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state
        if self.logits == "last":  # every op after the decoder is per position: slicing first changes no value
            hidden = hidden[:, -1:]
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        presents = []
        for i in range(self.num_layers):
            presents += [cache.layers[i].keys, cache.layers[i].values]
        return (logits, *presents)


def language_model_with_cache(family: str, model: nn.Module, logits: str = "last") -> LanguageModelWithCache:
    """Wrap the text decoder and LM head of a loaded ``*ForConditionalGeneration`` model."""
    inner = model.model
    decoder = getattr(inner, "language_model", inner)
    text_cfg = _text_config(model.config)
    cap = _logit_softcapping(family, text_cfg)
    return LanguageModelWithCache(decoder, model.lm_head, text_cfg.num_hidden_layers, cap, logits).eval()


def example_kv_inputs(family: str, text_cfg, batch=1, seq_len=5, past_len=3, seed=0):
    """Torch example inputs (tracing, tests): positions continue after the past."""
    gen = torch.Generator().manual_seed(seed)
    heads = text_cfg.num_attention_heads
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    embeds = torch.randn(batch, seq_len, text_cfg.hidden_size, generator=gen)
    pos = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len)
    if _uses_3d_positions(family):
        pos = pos.expand(3, batch, seq_len)
    mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * text_cfg.num_hidden_layers))
    return embeds, pos.contiguous(), mask, past


def export_language_model_with_cache(family: str, model: nn.Module, out_path, logits: str = "last") -> Path:
    """Trace ``model`` (a loaded VLM, eager attention) and write ``out_path``;
    float inputs and outputs take the dtype of the model's weights."""
    path = Path(out_path)
    program = trace_language_model_with_cache(family, model, logits=logits)
    program.model.metadata_props[LOGITS_METADATA] = logits
    _save(program, path, image_blocks=families.get(family).image_blocks)
    return path


#: metadata of the KV-cache graph: which positions its logits cover (:data:`LOGITS`)
LOGITS_METADATA = "blindsight.logits"


def trace_language_model_with_cache(family: str, model: nn.Module, optimize: bool = True, logits: str = "last"):
    """The ONNX program of the KV-cache language model; a model on the meta
    device traces with meta example inputs (its initializers hold no data,
    ``optimize`` must then be off: folding needs values)."""
    wrapper = language_model_with_cache(family, model, logits)
    text_cfg = wrapper.decoder.config
    n = wrapper.num_layers
    device = next(model.parameters()).device
    args = cast_floats(example_kv_inputs(family, text_cfg), model.dtype)
    blocks = families.get(family).image_blocks
    if blocks:  # a traced chunk holding one image block
        args = (*args, torch.tensor([[0, 1, 1, 1, 0]] * args[0].shape[0], dtype=torch.int64))
    if device.type != "cpu":
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else tuple(x.to(device) for x in a) for a in args)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq_len", min=1, max=1 << 18)
    past = torch.export.Dim("past_len", min=0, max=1 << 18)
    total = torch.export.Dim("total_len", min=1, max=1 << 19)
    dynamic = (
        {0: batch, 1: seq},
        {1: batch, 2: seq} if _uses_3d_positions(family) else {0: batch, 1: seq},
        {0: batch, 1: total},
        tuple({0: batch, 2: past} for _ in range(2 * n)),
    ) + (({0: batch, 1: seq},) if blocks else ())
    with torch.no_grad(), _quiet():
        return torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=["inputs_embeds", "position_ids", "attention_mask", *past_names(n)] + ([TOKEN_TYPE_INPUT] if blocks else []),
            output_names=["logits", *present_names(n)],
            dynamic_shapes=dynamic,
            optimize=optimize,
            report=False,
            verbose=False,
        )
