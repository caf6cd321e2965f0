"""Export the language-model *prefill* of supported VLM families to ONNX.

Three export forms are supported (see ``FORMS``):

``attention_op``
    ``torch.onnx.export(dynamo=True, opset_version=23)`` of the SDPA model: each
    layer's attention core becomes one ONNX ``Attention`` node (opset 23).
``decomposed``
    ``torch.onnx.export(dynamo=True)`` at the exporter's default opset (18) of the
    SDPA model: SDPA is decomposed into Mul-scaled Q and K^T, MatMul, Add(mask),
    Softmax, an IsNaN/Where guard and the final MatMul.
``eager``
    ``torch.onnx.export(dynamo=True)`` (default opset) of the model with
    ``attn_implementation="eager"``: MatMul, Mul(scale), Add(mask), Softmax, MatMul.

Graph interface of every export::

    inputs_embeds  float32 [B, S, hidden]
    position_ids   int64   [3, B, S] (qwen families) / [B, S] (gemma3)
    attention_mask int64   [B, S]   (1 = keep, 0 = padding)
    token_type_ids int64   [B, S]   (gemma3 only: 1 on image soft tokens, which
                                     attend each other bidirectionally)
    -> logits      float32 [B, S, vocab]

with dynamic ``B`` and ``S``; ``dtype="fp16"``/``"bf16"`` gives float16/bfloat16
embeds and logits (see :mod:`blindsight.models.dtype`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blindsight import families

from .configs import tiny_config
from .dtype import cast_floats, cast_mixed_norms, torch_dtype
from .image_blocks import TOKEN_TYPE_INPUT, mask_mapping

FORMS = ("attention_op", "decomposed", "eager")

#: opset used by the ``attention_op`` form (first opset with ``Attention``).
ATTENTION_OP_OPSET = 23
#: highest IR version onnxruntime 1.31 accepts for our purposes.
MAX_IR_VERSION = 10
#: models whose weights exceed this many bytes are saved with external data.
_EXTERNAL_DATA_THRESHOLD = 1_500_000_000

INPUT_NAMES = ("inputs_embeds", "position_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
#: spans of the example prompt traced for families with image blocks (so the
#: traced mask code sees real blocks), for a sequence of 40 tokens
_TRACE_SPANS = ((3, 12), (14, 20))


def input_names(family: str) -> tuple[str, ...]:
    """The prefill graph's inputs: families with image blocks add ``token_type_ids``."""
    return INPUT_NAMES + ((TOKEN_TYPE_INPUT,) if families.get(family).image_blocks else ())


def _check_family(family: str) -> None:
    families.get(family)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


def _text_config(config):
    """The text (decoder) config of a full VLM config or a text config."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", config)


def _uses_3d_positions(family: str) -> bool:
    return families.get(family).mrope_positions


# --------------------------------------------------------------------------- #
# Model loading
# --------------------------------------------------------------------------- #
class LanguageModelPrefill(nn.Module):
    """``forward(inputs_embeds, position_ids, attention_mask[, token_type_ids]) -> logits``.

    Runs the text decoder of a VLM on already-embedded inputs (no KV cache) and
    applies the LM head (plus the final logit soft-capping for gemma3 if the
    config asks for it). ``token_type_ids`` (Gemma 3) makes each run of image
    soft tokens bidirectional, as transformers' Gemma 3 does with them.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, final_logit_softcapping: float | None = None):
        super().__init__()
        self.decoder = decoder
        self.lm_head = lm_head
        self.final_logit_softcapping = final_logit_softcapping

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        if token_type_ids is not None:
            attention_mask = mask_mapping(self.decoder.config, inputs_embeds, attention_mask, None, position_ids, token_type_ids)
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


def _model_class(family: str, config):
    # a full VLM config -> conditional generation; a text-only one (gemma3's tiny config) -> causal LM
    return families.transformers_class(families.get(family).model_class_for(config))


def _logit_softcapping(family: str, text_cfg) -> float | None:
    """The final logit soft-capping the family applies (the text config's value), else None."""
    return getattr(text_cfg, "final_logit_softcapping", None) if families.get(family).logit_softcapping else None


def _split_model(family: str, model: nn.Module) -> LanguageModelPrefill:
    """Pull the text decoder and LM head out of a transformers model."""
    inner = model.model
    decoder = getattr(inner, "language_model", inner)
    text_cfg = _text_config(model.config)
    return LanguageModelPrefill(decoder, model.lm_head, _logit_softcapping(family, text_cfg))


def _perturb_constant_params(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Randomise 1-D parameters (norm weights, biases), which transformers
    initialises to constants.  Otherwise every layer would share the same
    all-ones/all-zeros tensors, the ONNX optimiser would deduplicate them into a
    single initializer, and the biases/norms would not be exercised at all."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def load_language_model(family: str, config_or_path, attn_implementation: str = "sdpa") -> nn.Module:
    """Build (config) or load (local HF directory) the language model of ``family``.

    Returns an eval-mode :class:`LanguageModelPrefill` in float32.  For a config
    object the weights are random, initialised after
    ``torch.manual_seed(config._blindsight_seed or 0)``.
    """
    _check_family(family)
    if isinstance(config_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(config_or_path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls = _model_class(family, config)
        model = cls.from_pretrained(
            path,
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=torch.float32,
        )
    else:
        config = copy.deepcopy(config_or_path)
        cls = _model_class(family, config)
        seed = int(getattr(config_or_path, "_blindsight_seed", 0))
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        _perturb_constant_params(model, seed)
    model.eval()
    wrapper = _split_model(family, model).eval()
    impl = wrapper.decoder.config._attn_implementation
    if impl != attn_implementation:
        raise RuntimeError(f"expected attn_implementation={attn_implementation!r}, model uses {impl!r}")
    return wrapper


# --------------------------------------------------------------------------- #
# Inputs / dims
# --------------------------------------------------------------------------- #
def text_dims(family: str, config) -> dict[str, Any]:
    """Attention-relevant dimensions of the text model of ``config``."""
    _check_family(family)
    t = _text_config(config)
    num_heads = t.num_attention_heads
    num_kv = getattr(t, "num_key_value_heads", None) or num_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // num_heads
    layer_types = list(getattr(t, "layer_types", None) or ["full_attention"] * t.num_hidden_layers)
    sliding = getattr(t, "sliding_window", None) if "sliding_attention" in layer_types else None
    return dict(
        num_layers=t.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=t.hidden_size,
        sliding_window=sliding,
        layer_types=layer_types,
    )


def example_inputs(family: str, config, batch: int = 1, seq_len: int = 40, seed: int = 0, spans=()) -> dict[str, np.ndarray]:
    """Numpy inputs for the exported graph (all-ones attention mask); families
    with image blocks get ``token_type_ids`` marking the interiors of ``spans``."""
    _check_family(family)
    dims = text_dims(family, config)
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, seq_len, dims["hidden_size"]), dtype=np.float32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, seq_len))
    if _uses_3d_positions(family):
        pos = np.broadcast_to(pos, (3, batch, seq_len))
    out = {
        "inputs_embeds": embeds,
        "position_ids": np.array(pos, dtype=np.int64, copy=True),
        "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
    }
    if families.get(family).image_blocks:
        from blindsight.attention.spans import token_type_ids

        out[TOKEN_TYPE_INPUT] = token_type_ids(spans, seq_len, rows=batch)
    return out


def _dynamic_shapes(family: str):
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq_len", min=2, max=1 << 16)
    pos = {1: batch, 2: seq} if _uses_3d_positions(family) else {0: batch, 1: seq}
    shapes = {
        "inputs_embeds": {0: batch, 1: seq},
        "position_ids": pos,
        "attention_mask": {0: batch, 1: seq},
    }
    if families.get(family).image_blocks:
        shapes[TOKEN_TYPE_INPUT] = {0: batch, 1: seq}
    return shapes


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def _quiet():
    """Silence the (very chatty) dynamo exporter: stdout, warnings and loggers."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _save(onnx_program, out_path: Path, image_blocks: bool = False, external_from: int = _EXTERNAL_DATA_THRESHOLD) -> None:
    """Write the program; weights of ``external_from`` bytes or more go to external data."""
    import onnx

    from blindsight.attention.schema import IMAGE_BLOCKS_METADATA

    cast_mixed_norms(onnx_program.model)  # a no-op on fp32 exports
    if image_blocks:  # bs-compile reads it: the nodes get image_blocks = 1
        onnx_program.model.metadata_props[IMAGE_BLOCKS_METADATA] = "1"
    proto = onnx_program.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size < external_from:
        onnx.save_model(proto, str(out_path))
        return
    # Large (real) checkpoints: weights go next to the model file.
    onnx_program.save(str(out_path), external_data=True)
    proto = onnx.load_model(str(out_path), load_external_data=False)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save_model(proto, str(out_path))


def export_language_model(
    family: str,
    form: str,
    out_path,
    *,
    config=None,
    batch: int = 1,
    seq_len: int = 40,
    seed: int = 0,
    dtype: str = "fp32",
):
    """Export the prefill of ``family`` in ``form`` to ``out_path`` and return ``out_path``.

    ``config`` may be a transformers config, a local checkpoint directory or
    ``None`` (= :func:`tiny_config(family) <blindsight.models.configs.tiny_config>`).
    ``batch``/``seq_len``/``seed`` define the example inputs used for tracing;
    batch and sequence length stay dynamic in the exported graph. ``dtype``
    (fp32, fp16, bf16): the model is cast to it before the export.
    """
    _check_family(family)
    _check_form(form)
    float_type = torch_dtype(dtype)
    if config is None:
        config = tiny_config(family)
    attn = "eager" if form == "eager" else "sdpa"
    model = load_language_model(family, config, attn).to(float_type)
    cfg = config if not isinstance(config, (str, os.PathLike)) else model.decoder.config

    names = input_names(family)
    spans = [s for s in _TRACE_SPANS if s[1] <= seq_len] if families.get(family).image_blocks else ()
    inputs = example_inputs(family, cfg, batch, seq_len, seed, spans=spans)
    args = cast_floats(tuple(torch.from_numpy(inputs[n]) for n in names), float_type)
    kwargs: dict[str, Any] = dict(
        dynamo=True,
        input_names=list(names),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=_dynamic_shapes(family),
        verbose=False,
        report=False,
        optimize=True,
    )
    if form == "attention_op":
        kwargs["opset_version"] = ATTENTION_OP_OPSET

    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet():
        onnx_program = torch.onnx.export(model, args, **kwargs)
    _save(onnx_program, path, image_blocks=families.get(family).image_blocks)
    return out_path
