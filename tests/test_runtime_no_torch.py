"""The runtime without torch and transformers.

Its tokenizer, chat template, image preprocessing and Qwen vision indices
equal transformers' on the tiny checkpoints, exactly; and bs-run answers, with
the same tokens, in a process where importing torch, transformers or
torchvision fails.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blindsight.families import FAMILIES, get
from blindsight.models.checkpoints import make_tiny_checkpoint
from blindsight.runtime.images import ImageProcessor
from blindsight.runtime.prompt import PromptBuilder
from blindsight.runtime.tokenizer import Tokenizer
from blindsight.vision_inputs import vision_cu_seqlens, vision_position_ids, vision_window_index

SIZES = [(50, 60), (90, 40), (56, 56), (10, 12), (300, 90), (17, 400), (640, 480), (224, 224)]  # (height, width)
TEXTS = ["hello world", "  leading spaces and\ttabs\n\nnewlines ", "ümlaut, 中文, emoji 🙂", "<b>not special</b>",
         "a <image> inline marker", ""]


def _image(size, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return im.convert(mode)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, make_tiny_checkpoint(request.param, tmp_path_factory.mktemp("nt") / request.param)


def _template(family, path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    ids = get(family).config_token_ids(config)
    if family == "gemma3":
        return {"family": family, **ids, "tokens_per_image": config.mm_tokens_per_image}
    return {"family": family, **ids, "spatial_merge_size": config.vision_config.spatial_merge_size}


CONVERSATIONS = [
    [{"role": "user", "content": "a plain string"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"},
                                  {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "two pictures"}]},
     {"role": "user", "content": "and now?"}],
]


def test_tokenizer_equals_transformers(checkpoint):
    from transformers import AutoTokenizer

    family, path = checkpoint
    want, got = AutoTokenizer.from_pretrained(path, local_files_only=True), Tokenizer(path)
    assert got.chat_template == want.chat_template and got.bos_token == want.bos_token
    for text in TEXTS:
        for special in (True, False):
            ids = want(text, add_special_tokens=special)["input_ids"]
            assert got.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert got.decode(ids, skip_special_tokens=skip) == want.decode(ids, skip_special_tokens=skip)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            rendered = want.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert got.apply_chat_template(conv, add_generation_prompt=gen) == rendered
    ids = list(range(0, len(want), 3))
    assert [got.convert_ids_to_tokens(i) for i in ids] == want.convert_ids_to_tokens(ids)


def test_chat_template_sandbox_and_helpers(tmp_path, checkpoint):
    """transformers' template helpers work, and the sandbox refuses what transformers' refuses."""
    import jinja2.exceptions

    _, path = checkpoint
    tok = Tokenizer(path)
    tok.chat_template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                         "{{ ns.n }} {{ messages | tojson }} {{ dict(a=1) | tojson }}{% generation %}!{% endgeneration %}")
    tok._compiled = None
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '1 [{"role": "user", "content": "é"}] {"a": 1}!'
    tok.chat_template, tok._compiled = "{{ raise_exception('no') }}", None
    with pytest.raises(jinja2.exceptions.TemplateError, match="no"):
        tok.apply_chat_template([])
    tok.chat_template, tok._compiled = "{{ messages.__class__.__mro__ }}", None
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([])


def test_pixels_equal_transformers_image_processor(checkpoint):
    """Bit-exact: both resize the uint8 RGB image with Pillow, then rescale and normalize with the same numpy ops."""
    from transformers import AutoImageProcessor

    family, path = checkpoint
    kwargs = dict(get(family).image_processor_kwargs)
    want_proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    got_proc = ImageProcessor.from_directory(path, family)
    batches = [[_image(s, i)] for i, s in enumerate(SIZES)] + [[_image(s, 9) for s in SIZES[:4]]]
    batches += [[_image((70, 30), 3, "L")], [_image((33, 80), 4, "RGBA").convert("RGB")]]
    for images in batches:
        want = want_proc([im.convert("RGB") for im in images], return_tensors="np", **kwargs)
        got = got_proc(images)
        assert got["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        if "image_grid_thw" in want:
            np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
        else:
            assert "image_grid_thw" not in got


def _reference_prompt(family, path, template, images, conv):
    """transformers' prompt ids: its template and tokenizer, the processor's image expansion."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if family == "gemma3":
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        text = proc.apply_chat_template(conv, add_generation_prompt=True)
        return proc(images=images or None, text=text, return_tensors="np")["input_ids"][0].tolist()
    # Qwen2VLProcessor cannot be built without torchvision: its expansion is one line
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    if images:
        grid = AutoImageProcessor.from_pretrained(path, local_files_only=True)(images, return_tensors="np")["image_grid_thw"]
        pad = tok.convert_ids_to_tokens(template["image_token_id"])
        for n in grid.prod(-1) // template["spatial_merge_size"] ** 2:
            text = text.replace(pad, "<|placeholder|>" * int(n), 1)
        text = text.replace("<|placeholder|>", pad)
    return tok(text)["input_ids"]


@pytest.mark.parametrize("prompt,sizes", [
    ("what is shown?", [(50, 60), (300, 90)]),
    ("first <image> then <image> and a question", [(17, 400), (56, 56)]),
    ("<image>describe it", [(640, 480)]),
    ("no picture here", []),
])
def test_prompt_ids_equal_transformers(checkpoint, prompt, sizes):
    from blindsight.runtime.prompt import split_prompt

    family, path = checkpoint
    template = _template(family, path)
    images = [_image(s, i) for i, s in enumerate(sizes)]
    got = PromptBuilder(path, template).build(images, prompt)
    conv = [{"role": "user", "content": split_prompt(prompt, len(images))}]
    assert got.input_ids.tolist() == _reference_prompt(family, path, template, images, conv)


GRIDS = [[[1, 4, 4]], [[1, 2, 2]], [[1, 8, 6], [1, 2, 10]], [[2, 4, 8]], [[1, 16, 12], [2, 6, 6], [1, 22, 4]],
         [[1, 38, 2], [1, 2, 38]]]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_vision_indices_equal_transformers(grid):
    import torch
    from transformers import vision_utils as vu

    g = torch.tensor(grid, dtype=torch.int64)
    np.testing.assert_array_equal(vision_position_ids(grid, 2), vu.get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(vision_cu_seqlens(grid), vu.get_vision_cu_seqlens(g).numpy())
    for window, patch in ((112, 14), (224, 14), (56, 14), (64, 16)):
        index, cu = vision_window_index(grid, 2, window, patch)
        want_index, want_cu = vu.get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=patch)
        np.testing.assert_array_equal(index, want_index.numpy())
        np.testing.assert_array_equal(cu, want_cu.numpy())
        assert index.dtype == cu.dtype == np.int64


# ------------------------------------------------------------------ import boundary
WRAPPER = """
import atexit, importlib.abc, sys
blocked, attempts = set(sys.argv[1].split(",")), []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
atexit.register(lambda: print("BLOCKED-IMPORTS", sorted(set(attempts)), file=sys.stderr))
from blindsight.runtime.cli import main
sys.exit(main(sys.argv[2:]))
"""
BLOCKED = ("torch", "transformers", "torchvision")


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """A tiny export with a compiled (sparse) language model, and two images."""
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.export_vlm import export_vlm
    from blindsight.profile import Profile

    root = tmp_path_factory.mktemp(f"nt_{request.param}")
    out = export_vlm(make_tiny_checkpoint(request.param, root / "ckpt"), root / "export", progress=False).out_dir
    t = json.loads((out / "template.json").read_text())
    cats = [["intra", "sink", "intra_sink", "dense"][: t["num_heads"]]] * t["num_layers"]
    compile_model(out / "language_model.onnx", Profile(cats, num_kv_heads=t["num_kv_heads"]),
                  out / "language_model.blindsight.onnx")
    paths = []
    for i, size in enumerate([(48, 60), (90, 40)]):
        rng = np.random.default_rng(i)
        paths.append(out / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize(size[::-1], Image.NEAREST).save(paths[-1])
    return out, paths


def test_bs_run_without_torch_and_transformers(exported):
    out, paths = exported
    args = [str(out), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt", "compare <image> with <image>",
            "--max-new-tokens", "5", "--threads", "2", "--json"]
    blocked = subprocess.run([sys.executable, "-c", WRAPPER, ",".join(BLOCKED), *args], capture_output=True, text=True,
                             timeout=300)
    assert blocked.returncode == 0, blocked.stderr
    assert "BLOCKED-IMPORTS []" in blocked.stderr, blocked.stderr  # nothing even tried
    normal = subprocess.run([sys.executable, "-m", "blindsight.runtime.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert normal.returncode == 0, normal.stderr
    got, want = json.loads(blocked.stdout), json.loads(normal.stdout)
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 5
    assert got["image_spans"] == want["image_spans"] and len(got["image_spans"]) == 2 and got["sparse"] is True


@pytest.fixture(scope="session")
def deployment_venv(tmp_path_factory):
    """A fresh virtual environment with only the deployment install: the package
    and its core dependencies from the registry (no torch, no transformers)."""
    import os
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env_dir = tmp_path_factory.mktemp("deploy") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(root)], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return env_dir, env


def test_bs_run_in_a_deployment_venv(exported, deployment_venv):
    """The deployment install answers like the development install, and has no torch."""
    out, paths = exported
    env_dir, env = deployment_venv
    py, bs_run = env_dir / "bin" / "python", env_dir / "bin" / "bs-run"
    missing = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                              "'torchvision') if u.find_spec(m)])"], capture_output=True, text=True, env=env)
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr
    args = [str(out), "--image", str(paths[0]), "--prompt", "<image> describe", "--max-new-tokens", "4", "--threads", "2",
            "--json"]
    got = subprocess.run([str(bs_run), *args], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr
    want = subprocess.run([sys.executable, "-m", "blindsight.runtime.cli", *args], capture_output=True, text=True, timeout=300)
    assert json.loads(got.stdout)["token_ids"] == json.loads(want.stdout)["token_ids"]
