"""Tiny random VLM checkpoint directories load offline in transformers and generate."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blindsight.families import FAMILIES
from blindsight.models.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, make_tiny_checkpoint(request.param, tmp_path_factory.mktemp("ck") / request.param)


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 60, 3), dtype=np.uint8)) for i in range(n)]


def _special_ids(family, config):
    if family == "gemma3":
        return {"<start_of_image>": config.boi_token_index, "<end_of_image>": config.eoi_token_index,
                "<image_soft_token>": config.image_token_index}
    return {"<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
            "<|image_pad|>": config.image_token_id}


def test_loads_offline_with_special_tokens_at_config_ids(checkpoint):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    family, path = checkpoint
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert config.model_type == family
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for token, tid in _special_ids(family, config).items():
        assert tok.convert_tokens_to_ids(token) == tid
        assert tok.encode(token, add_special_tokens=False) == [tid]  # never split
    assert config.text_config.vocab_size >= len(tok)
    assert tok.decode(tok.encode("héllo, wörld", add_special_tokens=False)) == "héllo, wörld"
    assert tok.chat_template and AutoImageProcessor.from_pretrained(path, local_files_only=True)
    assert set(json.loads((path / "config.json").read_text())) >= {"text_config", "vision_config"}


def _prompt_inputs(family, path, images, text):
    """Inputs the family's processor would give, built from its parts (Qwen's processor class
    needs torchvision to be constructed, so the placeholder expansion is done here)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if family == "gemma3":
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        return proc(images=images, text=text, return_tensors="pt")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pix = AutoImageProcessor.from_pretrained(path, local_files_only=True)(images, return_tensors="pt")
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(images) + 1
    counts = (pix["image_grid_thw"].prod(-1) // 4).tolist()
    text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
    ids = tok(text, return_tensors="pt")
    return {**ids, **pix}


def test_generate_with_images_in_the_real_prompt_structure(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    family, path = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image = {"type": "image"}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "compare"}, image,
                                             {"type": "text", "text": "these two"}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = _prompt_inputs(family, path, _images(2), text)
    ids = inputs["input_ids"][0].tolist()
    sid = _special_ids(family, model.config)
    start, end, pad = list(sid.values())
    assert ids.count(start) == ids.count(end) == 2
    # each image: start delimiter, its pad/soft tokens, end delimiter
    first = ids.index(start)
    n = ids.index(end) - first - 1
    assert n > 0 and ids[first + 1:first + 1 + n] == [pad] * n
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert len(new) == 6 and all(0 <= t < model.config.text_config.vocab_size for t in new)


def test_same_seed_same_weights_and_new_seed_differs(tmp_path):
    from safetensors.numpy import load_file

    a = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_tiny_checkpoint("qwen2_vl", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_checkpoint("llama", tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_bs_checkpoint_writes_the_tiny_checkpoint_and_refuses_bad_input_in_one_line(tmp_path):
    """bs-checkpoint tiny-NAME writes what make_tiny_checkpoint writes for that family and seed
    (same files, same weights); an unknown name or a missing -o is one usage error, exit 2."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "blindsight.models.fullsize", *map(str, args)],
                              capture_output=True, text=True)

    r = cli("tiny-qwen2.5-vl", "-o", tmp_path / "cli", "--seed", "4")
    assert r.returncode == 0 and "wrote" in r.stderr, r.stderr
    ref = make_tiny_checkpoint("qwen2_5_vl", tmp_path / "ref", seed=4)
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(p.name for p in ref.iterdir())
    got, want = load_file(tmp_path / "cli" / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    for args in (("tiny-llava", "-o", tmp_path / "x"), ("tiny-gemma3",)):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("bs-checkpoint: error:")
    assert not (tmp_path / "x").exists()
