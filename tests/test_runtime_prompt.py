"""Runtime pieces that need no export: prompts, image spans from ids, M-RoPE ids, bs-run's input errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blindsight.errors import BlindSightError
from blindsight.families import FAMILIES
from blindsight.models.checkpoints import make_tiny_checkpoint
from blindsight.runtime.positions import mrope_position_ids
from blindsight.runtime.prompt import PromptBuilder, split_prompt
from blindsight.attention import Delimiters, find_spans


def template_of(family, config) -> dict:
    """The template.json fields the prompt builder reads, from the checkpoint's config."""
    if family == "gemma3":
        return {"family": family, "image_token_id": config.image_token_index, "image_start_id": config.boi_token_index,
                "image_end_id": config.eoi_token_index, "tokens_per_image": config.mm_tokens_per_image}
    return {"family": family, "image_token_id": config.image_token_id, "image_start_id": config.vision_start_token_id,
            "image_end_id": config.vision_end_token_id, "spatial_merge_size": config.vision_config.spatial_merge_size}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    from transformers import AutoConfig

    family = request.param
    path = make_tiny_checkpoint(family, tmp_path_factory.mktemp("rt") / family)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return family, path, config, PromptBuilder(path, template_of(family, config))


def _images(n, sizes=((50, 60), (90, 40), (56, 56))):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


PROMPTS = [  # (prompt, images): images first, between text, at the very end, none
    ("what is shown?", 2),
    ("first <image> then <image> and a question", 2),
    ("<image>describe it", 1),
    ("the last one: <image>", 1),
    ("no picture here", 0),
]


@pytest.mark.parametrize("prompt,n", PROMPTS)
@pytest.mark.parametrize("chat", [True, False])
def test_spans_from_ids_cover_each_image_with_its_delimiters(tiny, prompt, n, chat):
    family, path, config, builder = tiny
    t = builder.template
    built = builder.build(_images(n), prompt, chat=chat)
    ids = built.input_ids
    spans = find_spans(ids, Delimiters(t["image_start_id"], t["image_end_id"]))
    assert len(spans) == n
    if family == "gemma3":
        per_image = [config.mm_tokens_per_image] * n
    else:
        per_image = (built.image_grid_thw.prod(-1) // 4).tolist() if n else []
    for (start, end), count in zip(spans.tolist(), per_image):
        assert ids[start] == t["image_start_id"] and ids[end - 1] == t["image_end_id"]
        assert (ids[start + 1:end - 1] == t["image_token_id"]).all() and end - start - 2 == count
    outside = np.ones(ids.size, bool)
    for start, end in spans.tolist():
        outside[start:end] = False
    assert not np.isin(ids[outside], [t["image_token_id"], t["image_start_id"], t["image_end_id"]]).any()
    if not chat and prompt.startswith("<image>") and family != "gemma3":
        assert spans[0, 0] == 0  # an image at the very start of the prompt
    if not chat and prompt.endswith("<image>") and family != "gemma3":
        assert spans[-1, 1] == ids.size  # ... and at the very end
    if not chat:  # the text around the images survives tokenization
        assert builder.decode(ids[outside]).strip().endswith(prompt.split("<image>")[-1].strip())


def test_gemma3_prompt_equals_transformers_processor(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    path = make_tiny_checkpoint("gemma3", tmp_path / "g")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    builder = PromptBuilder(path, template_of("gemma3", config))
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    images = _images(2)
    messages = [{"role": "user", "content": [{"type": "text", "text": "look:"}, {"type": "image"},
                                             {"type": "text", "text": "and"}, {"type": "image"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    want = proc(images=images, text=text, return_tensors="np")
    got = builder.build(images, "look:<image>and<image>")
    assert got.input_ids.tolist() == want["input_ids"][0].tolist()
    np.testing.assert_array_equal(got.pixel_values, want["pixel_values"])


def test_marker_count_must_match_images():
    with pytest.raises(BlindSightError, match="2 <image> marker"):
        split_prompt("a <image> b <image>", 3)
    assert split_prompt("q", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("prompt,n", PROMPTS)
def test_mrope_ids_equal_transformers(family, prompt, n, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForImageTextToText

    root = tmp_path_factory.getbasetemp() / f"mrope_{family}"
    if not root.exists():
        make_tiny_checkpoint(family, root)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(root, local_files_only=True).eval()
    built = PromptBuilder(root, template_of(family, config)).build(_images(n), prompt, chat=False)
    ids = built.input_ids
    pos, delta = mrope_position_ids(ids, config.image_token_id, built.image_grid_thw if n else np.zeros((0, 3)),
                                    config.vision_config.spatial_merge_size)
    mm = torch.as_tensor((ids == config.image_token_id).astype(np.int64))[None]
    grid = torch.as_tensor(built.image_grid_thw) if n else None
    want, want_delta = model.model.get_rope_index(torch.as_tensor(ids)[None], mm_token_type_ids=mm, image_grid_thw=grid)
    np.testing.assert_array_equal(pos, want[:, 0].numpy())
    assert delta == int(want_delta[0, 0])


def test_mrope_rejects_a_grid_that_disagrees_with_the_prompt():
    ids = np.array([5, 9, 9, 9, 6])
    with pytest.raises(ValueError, match="3 image tokens"):
        mrope_position_ids(ids, 9, [[1, 4, 4]], 2)


def _bs_run(*args):
    return subprocess.run([sys.executable, "-m", "blindsight.runtime.cli", *map(str, args)], capture_output=True, text=True)


def _one_line_failure(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bs_run_bad_inputs_give_one_line(tmp_path):
    import onnxruntime as ort

    _one_line_failure(_bs_run(tmp_path, "--prompt", "hi"), "not a bs-export directory")
    (tmp_path / "template.json").write_text(json.dumps({"format": "blindsight-export", "version": 1, "family": "gemma3",
                                                        "files": {"language_model": "language_model.onnx"}}))
    _one_line_failure(_bs_run(tmp_path, "--prompt", "hi"), "no compiled model", "bs-compile")
    _one_line_failure(_bs_run(tmp_path, "--prompt", "hi", "--model", tmp_path / "x.onnx"), "does not exist")
    _one_line_failure(_bs_run(tmp_path, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens")
    missing = [p for p, ep in [("cuda", "CUDAExecutionProvider"), ("rocm", "ROCMExecutionProvider"),
                               ("migraphx", "MIGraphXExecutionProvider")] if ep not in ort.get_available_providers()]
    assert missing, "this test needs an onnxruntime build without some execution provider"
    r = _bs_run(tmp_path, "--prompt", "hi", "--model", "dense", "--provider", missing[0])
    _one_line_failure(r, f"{missing[0]!r} is not available", "available: cpu")
