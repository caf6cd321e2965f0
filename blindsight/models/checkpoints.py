"""Tiny random Hugging Face VLM checkpoint directories, made offline.

``make_tiny_checkpoint(family, out_dir)`` writes what a real checkpoint folder
holds (config, safetensors weights, tokenizer, image processor, processor and
chat template) for Qwen2-VL, Qwen2.5-VL or Gemma 3, small enough for tests:
transformers' ``AutoModelForImageTextToText``, ``AutoProcessor`` and
``bs-export`` load it with ``local_files_only=True``.

``make_tiny_qwen3_vl_checkpoint(out_dir)`` writes a Qwen3-VL checkpoint for
onnxruntime-genai's model builder only (config, weights, tokenizer and chat
template; no image processor): Qwen3-VL is not a ``bs-export`` family.

The tokenizer is byte-level BPE without merges (every UTF-8 string encodes,
one token per byte) plus the family's special tokens. A real vocabulary would
put the image delimiters at ids above 150 000, which would make the embedding
tables dominate the checkpoint, so the ids here are small and recorded in the
config (``vision_start_token_id`` ..., ``boi_token_index`` ...) as in the real
checkpoints; consumers read them from there (template.json), never assume them.
"""

from __future__ import annotations

import json
from pathlib import Path

from blindsight import families
from blindsight.staging import staged_dir
from blindsight.configs import (
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_HIDDEN,
    TINY_INTERMEDIATE,
    TINY_MROPE_SECTION,
    TINY_SLIDING_WINDOW,
)

# Qwen2-VL image geometry: 14-pixel patches, 2x2 merge, so a 56x56 image is a
# 4x4 patch grid and 4 image tokens; images are resized into [min, max] pixels.
QWEN_PATCH = 14
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 112 * 112
# the released Qwen2-VL / Qwen2.5-VL processors' bounds, for full-size configurations
PUBLISHED_QWEN_MIN_PIXELS = 56 * 56
PUBLISHED_QWEN_MAX_PIXELS = 28 * 28 * 16384

# Gemma 3 image geometry: 28x28 images, 7-pixel patches (4x4), pooled to 2x2
# = 4 soft tokens per image.
GEMMA_IMAGE = 28
GEMMA_PATCH = 7
GEMMA_TOKENS_PER_IMAGE = 4

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
GEMMA_LEADING = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3 as in the released tokenizer
GEMMA_TRAILING = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA_CHAT_TEMPLATE = (
    # no bos_token here: the tokenizer adds <bos> when the text is encoded
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _byte_level_tokenizer(leading: list[str], trailing: list[str], bos: str | None = None):
    """A tokenizers.Tokenizer: ``leading`` specials, the 256 byte symbols, ``trailing`` specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {}
    for tok in leading + sorted(ByteLevel.alphabet()) + trailing:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(leading + trailing)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok, vocab


def _text_dims(vocab_size: int, num_layers: int, num_kv_heads: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE,
                num_hidden_layers=num_layers, num_attention_heads=TINY_HEADS,
                num_key_value_heads=num_kv_heads, max_position_embeddings=2048)


def _qwen(spec: families.Family, num_layers: int, num_kv_heads: int):
    from transformers import PreTrainedTokenizerFast

    tok, vocab = _byte_level_tokenizer([], QWEN_SPECIALS)
    ids = {t: vocab[t] for t in QWEN_SPECIALS}
    text = _text_dims(len(vocab), num_layers, num_kv_heads)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": list(TINY_MROPE_SECTION)},
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec.windowed_vision:  # Qwen2.5-VL's tower
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_HIDDEN,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[1])
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
    config = families.transformers_class(spec.config_class)(text_config=text, vision_config=vision, **tokens,
                    eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    return config, families.transformers_class(spec.model_class), tokenizer


def _qwen_image_processor(config=None):
    # the Pil variant: the default one needs torchvision, which is not a dependency
    from transformers import Qwen2VLImageProcessorPil

    # tiny checkpoints keep images small; a full-size configuration gets the released bounds,
    # so that an image is as many tokens as it would be with the published checkpoint
    low, high = (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS) if config is None else (PUBLISHED_QWEN_MIN_PIXELS, PUBLISHED_QWEN_MAX_PIXELS)
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": low, "longest_edge": high},
        patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2)


def _save_qwen_processor(spec: families.Family, tokenizer, out: Path, config=None) -> None:
    """Tokenizer, image processor, chat template and processor class, as a released checkpoint has them
    (``config``: a full-size configuration, whose released image-size bounds the processor takes).

    Without torchvision transformers cannot build ``Qwen2VLProcessor`` (it
    requires a video processor), so the parts are saved one by one; the
    runtime reads them with AutoTokenizer / AutoImageProcessor.
    """
    tokenizer.save_pretrained(out)
    _qwen_image_processor(config).save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": spec.processor_class}, indent=2) + "\n")


def _gemma3(spec: families.Family, num_layers: int, num_kv_heads: int):
    from transformers import PreTrainedTokenizerFast

    tok, vocab = _byte_level_tokenizer(GEMMA_LEADING, GEMMA_TRAILING, bos="<bos>")
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"] if num_layers > 1 else ["sliding_attention"]
    text = _text_dims(len(vocab), num_layers, num_kv_heads)
    text.update(head_dim=TINY_HEAD_DIM, query_pre_attn_scalar=TINY_HEAD_DIM, sliding_window=TINY_SLIDING_WINDOW,
                layer_types=layer_types, rms_norm_eps=1e-6,
                pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=GEMMA_IMAGE, patch_size=GEMMA_PATCH)
    config = families.transformers_class(spec.config_class)(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA_TOKENS_PER_IMAGE,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab["<image_soft_token>"],
                          # untied: with tied random embeddings greedy decoding echoes the last token
                          tie_word_embeddings=False,
                          eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]], pad_token_id=vocab["<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>", "start_of_turn_token": "<start_of_turn>",
                              "end_of_turn_token": "<end_of_turn>"})
    return config, families.transformers_class(spec.model_class), tokenizer


def _save_gemma3_processor(spec: families.Family, tokenizer, out: Path, config=None) -> None:
    """``config``: a full-size configuration, whose image size and tokens per image the processor takes."""
    from transformers import Gemma3ImageProcessorPil

    side = GEMMA_IMAGE if config is None else int(config.vision_config.image_size)
    tokens = GEMMA_TOKENS_PER_IMAGE if config is None else int(config.mm_tokens_per_image)
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = families.transformers_class(spec.processor_class)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=tokens)
    processor.save_pretrained(out)


# (config, model class, tokenizer) and the processor files of a tiny checkpoint, by kind of vision tower
_BUILDERS = {families.QWEN_VISION: (_qwen, _save_qwen_processor),
             families.SIGLIP_VISION: (_gemma3, _save_gemma3_processor)}


def _spread_weights(model, family: str) -> None:
    """Re-draw the weights so generations depend on the prompt and the images.

    transformers' N(0, 0.02) init leaves a tiny model's residual stream to the
    last token's embedding: greedy decoding then ignores the rest of the prompt
    and the images, and a parity test would prove little. Embeddings get
    N(0, 1), other matrices and convolutions N(0, 2 / sqrt(fan_in)).
    """
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                continue
            if "embed" in name and "patch_embed" not in name:
                p.normal_(0.0, 1.0)
            elif name.endswith("mm_input_projection_weight"):
                # Gemma 3 applies it as x @ W (fan-in = rows) after a norm; sized so image
                # features are as large as the sqrt(hidden)-scaled text embeddings
                p.normal_(0.0, (p.shape[1] / p.shape[0]) ** 0.5)
            else:
                p.normal_(0.0, 2.0 / p[0].numel() ** 0.5)


def build_tiny(family: str, *, seed: int = 0, num_layers: int = 2, num_kv_heads: int = 2):
    """(model, tokenizer) of a tiny random VLM of ``family``, in memory."""
    spec = families.get(family)
    import torch

    build, _ = _BUILDERS[spec.vision_tower]
    config, Model, tokenizer = build(spec, num_layers, num_kv_heads)
    torch.manual_seed(seed)
    model = Model(config).eval()
    _spread_weights(model, family)
    return model, tokenizer


def make_tiny_checkpoint(family: str, out_dir, seed: int = 0, *, num_layers: int = 2, num_kv_heads: int = 2) -> Path:
    """Write a tiny random checkpoint directory of ``family`` at ``out_dir``; return its path.

    The directory is assembled in a temporary sibling and renamed into place, so
    a failure never leaves a half-written checkpoint.
    """
    out = Path(out_dir)
    spec = families.get(family)
    _, save_processor = _BUILDERS[spec.vision_tower]
    model, tokenizer = build_tiny(family, seed=seed, num_layers=num_layers, num_kv_heads=num_kv_heads)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(spec, tokenizer, tmp)
        (tmp / "blindsight_tiny.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out


def make_tiny_qwen3_vl_checkpoint(out_dir, seed: int = 0, *, num_layers: int = 2, num_kv_heads: int = 2) -> Path:
    """A tiny random Qwen3-VL checkpoint (transformers' ``qwen3_vl``) for
    onnxruntime-genai's builder: the tiny text dimensions with q/k norms and
    interleaved M-RoPE, a 2-block vision tower with one deepstack layer, the Qwen
    byte-level tokenizer and chat template. No image processor: the builder
    reads the config, the weights and the tokenizer."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    tok, vocab = _byte_level_tokenizer([], QWEN_SPECIALS)
    ids = {t: vocab[t] for t in QWEN_SPECIALS}
    text = _text_dims(len(vocab), num_layers, num_kv_heads)
    # interleaved M-RoPE: H owns frequencies 1, 4, ... (3 * h), W 2, 5, ... (3 * w), T the rest, so
    # the sections are (head_dim / 2 - h - w, h, w); the released models' (24, 20, 20) at head_dim 128
    text.update(head_dim=TINY_HEAD_DIM, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _spread_weights(model, "qwen3_vl")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
        (tmp / "blindsight_tiny.json").write_text(json.dumps({"family": "qwen3_vl", "seed": seed}) + "\n")
    return out
