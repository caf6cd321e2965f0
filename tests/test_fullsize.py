"""Full-size random checkpoints: the packaged configurations match the
published parameter counts, and the shard writer produces a checkpoint that
transformers loads with every tensor in place (shrunk here, the same code path)."""

from __future__ import annotations

import json

import pytest

from blindsight.errors import BlindSightError

torch = pytest.importorskip("torch")

# parameter counts of the released checkpoints (model cards / safetensors metadata), shared tensors once
PUBLISHED = {"qwen2-vl-2b": 2.21e9, "qwen2.5-vl-3b": 3.75e9, "qwen2.5-vl-7b": 8.29e9, "gemma-3-4b": 4.30e9}

SMALL = {
    "qwen2-vl-2b": {"text_config": {"num_hidden_layers": 2, "vocab_size": 700},
                    "vision_config": {"depth": 1}},
    "gemma-3-4b": {"text_config": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
                                   "query_pre_attn_scalar": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "vocab_size": 700, "sliding_window_pattern": 2},
                   "vision_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48,
                                     "num_attention_heads": 2, "image_size": 56}},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_have_the_published_sizes(name):
    from blindsight.models.fullsize import parameter_count

    assert parameter_count(name) == pytest.approx(PUBLISHED[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_random_checkpoint_loads_with_every_tensor(name, tmp_path):
    from safetensors import safe_open

    from blindsight.models.fullsize import MARKER, full_config, write_random_checkpoint

    limit = 1 << 16
    out = write_random_checkpoint(name, tmp_path / name, dtype="fp16", shard_bytes=limit, progress=False,
                                  overrides=SMALL[name])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # the 64 KiB limit split it
    for f in shards:
        with safe_open(str(out / f), "pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).numel() * 2 for k in keys)
        assert size <= limit or len(keys) == 1  # over the limit only when one tensor alone is larger
    _, model_class, _, _ = full_config(name, SMALL[name])
    model, info = model_class.from_pretrained(out, local_files_only=True, dtype=torch.float16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # stored under the names, and with the values, that transformers' save_pretrained writes for
    # the loaded model, as published checkpoints are (llama.cpp's converter reads Qwen2-VL's
    # vision tower as visual.*, not model.visual.*)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    saved = {}
    for f in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            saved.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(index["weight_map"]) == set(saved)
    with safe_open(str(out / shards[0]), "pt") as h:
        for key in h.keys():
            torch.testing.assert_close(saved[key], h.get_tensor(key))
    assert json.loads((out / MARKER).read_text())["random_weights"] is True
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    # the processor makes as many image tokens as the configuration's vision tower and the released
    # processor do (an 896 x 896 px image: 1,024 Qwen tokens; Gemma 3: mm_tokens_per_image at image_size)
    import numpy as np
    from transformers import AutoImageProcessor

    config = model.config
    pixels = np.zeros((896, 896, 3), dtype=np.uint8)
    processed = AutoImageProcessor.from_pretrained(out).preprocess(pixels, return_tensors="np")
    if config.model_type == "gemma3":
        side = config.vision_config.image_size
        assert processed["pixel_values"].shape[-2:] == (side, side)
        assert json.loads((out / "processor_config.json").read_text())["image_seq_length"] == config.mm_tokens_per_image
    else:
        merge = config.vision_config.spatial_merge_size
        assert int(np.prod(processed["image_grid_thw"][0])) // merge**2 == 1024


def test_unknown_configuration_is_one_line():
    from blindsight.models.fullsize import write_random_checkpoint

    with pytest.raises(BlindSightError, match="expected one of"):
        write_random_checkpoint("qwen2-vl-72b", "/nonexistent")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_structure_export_equals_the_real_export(name, tmp_path):
    """The meta-device export (weights never held, streamed to external data)
    runs like the export of a real model with the same weights: same logits and
    presents in ONNX Runtime; the buffers it computes for real (rotary
    frequencies) are the real model's."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from blindsight import families
    from blindsight.models.export_kv import example_kv_inputs, export_language_model_with_cache, language_model_with_cache, past_names
    from blindsight.models.fullsize import export_language_model_structure, full_config

    config, model_class, _, _ = full_config(name, SMALL[name])
    family = config.model_type
    torch.manual_seed(3)
    real = model_class._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in real.parameters():
            p.normal_(0, 0.2)  # so that a wrong wiring shows in the logits
    state = {k: v.detach().numpy() for k, v in language_model_with_cache(family, real).state_dict().items()}
    raw = export_language_model_with_cache(family, real, tmp_path / "real.onnx")
    drawn = export_language_model_structure(name, tmp_path / "structure.onnx", dtype="fp32", overrides=SMALL[name],
                                            progress=False, weights=state.get)
    text = config.text_config
    proto = onnx.load(str(drawn), load_external_data=False)
    assert any(t.external_data for t in proto.graph.initializer)
    # weights are written transposed as bs-export folds them: nothing for ONNX Runtime to fold into a private copy
    weights = {t.name for t in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    assert sum(n.op_type == "MatMul" and n.input[1] in weights for n in proto.graph.node) >= 7 * text.num_hidden_layers
    e, pos, mask, past = example_kv_inputs(family, text, seq_len=5, past_len=3)
    feeds = {"inputs_embeds": e.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy(),
             **{n: x.numpy() for n, x in zip(past_names(text.num_hidden_layers), past)}}
    if families.get(family).image_blocks:
        feeds["token_type_ids"] = np.array([[0, 1, 1, 1, 0]], dtype=np.int64)
    want = ort.InferenceSession(str(raw)).run(None, feeds)
    got = ort.InferenceSession(str(drawn)).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    assert np.abs(want[0]).max() > 1e-2
