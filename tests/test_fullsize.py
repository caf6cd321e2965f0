"""Full-size random checkpoints (issue 13): the packaged configurations match the
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
    with safe_open(str(out / shards[0]), "pt") as h:
        key = next(iter(h.keys()))
        torch.testing.assert_close(model.state_dict()[key], h.get_tensor(key))
    assert json.loads((out / MARKER).read_text())["random_weights"] is True
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_unknown_configuration_is_one_line():
    from blindsight.models.fullsize import write_random_checkpoint

    with pytest.raises(BlindSightError, match="expected one of"):
        write_random_checkpoint("qwen2-vl-72b", "/nonexistent")
