"""bs-compile --genai: a tiny random Qwen2.5-VL bs-export as one onnxruntime-genai
VLM (genai's image processor, vision, embedding, the compiled decoder), and a
Qwen2-VL export under genai's qwen2_5_vl type.

The wrappers are checked in onnxruntime against the graphs they wrap; genai's
greedy tokens against the project's Pipeline, which runs the source graphs
with the vision index inputs, a numpy merge, M-RoPE position ids and explicit
image_spans, fed genai's processor output so both see the same pixels."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _util import run, session
from blindsight.profile import Profile, save

LAYERS, HEADS, KV_HEADS = 2, 4, 2
NEW_TOKENS = 8
HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
# Qwen geometry of the tiny checkpoint (14-px patches, 2x2 merge): 84x56 px is a
# 1x4x6 patch grid (6 image tokens), 56x84 px 1x6x4
# 1x6x4; 56x56 px is 1x4x4, fewer patches: genai's processor pads them to the first's count
IMAGES = {"wide.png": (56, 84), "tall.png": (84, 56), "small.png": (56, 56)}
PROMPTS = {"one image": ["wide.png"], "two images": ["wide.png", "tall.png"],
           "two sizes": ["small.png", "tall.png", "wide.png"]}


def bs_compile(*args):
    return subprocess.run([sys.executable, "-m", "blindsight.compiler.cli", *map(str, args)], capture_output=True, text=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """The export, its file contents before any write, images, and genai folders:
    all-dense through the Python API on the function bodies, sparse through
    bs-compile --genai (the native kernel named when built)."""
    from PIL import Image

    from blindsight.compiler.genai_vlm import write_genai_vlm
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp("genai_vlm")
    ckpt = make_tiny_checkpoint("qwen2_5_vl", root / "checkpoint", seed=3)
    export = export_vlm(ckpt, root / "export").out_dir
    before = _tree(export)
    rng = np.random.default_rng(0)
    for name, (h, w) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    dense = Profile.uniform("dense", LAYERS, HEADS, num_kv_heads=KV_HEADS)
    # no dense head: the tiny model's tokens move under it for the prompts below
    sparse = Profile([[("sink", "intra", "sink", "intra_sink")[(h + layer) % 4] for h in range(HEADS)]
                      for layer in range(LAYERS)], num_kv_heads=KV_HEADS)
    save(sparse, root / "sparse.json")
    write_genai_vlm(export, dense, root / "dense", native=False)
    r = bs_compile(export, "--genai", "--profile", root / "sparse.json", "-o", root / "sparse")
    assert r.returncode == 0, r.stderr
    assert "genai VLM folder" in r.stdout and "sink 4" in r.stdout
    # the reference's compiled language model: compiling is deterministic, so this is the genai folder's graph
    sparse_lm = compile_model(export / "language_model.onnx", sparse, root / "lm.sparse.onnx").output
    return dict(root=root, export=export, before=before, dense=root / "dense", sparse=root / "sparse", sparse_lm=sparse_lm)


def test_writes_a_genai_folder_and_leaves_the_export_alone(vlm):
    from blindsight import native

    export = vlm["export"]
    assert _tree(export) == vlm["before"]
    for name in ("dense", "sparse"):
        out = vlm[name]
        files = {p.name for p in out.iterdir()}
        assert {"genai_config.json", "genai_processor_config.json", "embed.genai.onnx", "language_model.genai.onnx",
                "vision.genai.onnx", "tokenizer.json", "tokenizer_config.json", "template.json"} <= files
        # genai's default processor file name is transformers' processor_config.json: not copied, not used
        assert "processor_config.json" not in files and "language_model.onnx" not in files and "vision.onnx" not in files
        assert json.loads((out / "template.json").read_text())["vision_index_in_graph"] is True
        assert not [f for f in files if f.startswith(".")]
        config = json.loads((out / "genai_config.json").read_text())
        model = config["model"]
        assert model["type"] == "qwen2_5_vl" and config["search"]["past_present_share_buffer"] is False
        template = json.loads((export / "template.json").read_text())
        assert (model["image_token_id"], model["vision_start_token_id"]) == (template["image_token_id"], template["image_start_id"])
        assert model["decoder"]["filename"] == "language_model.genai.onnx" and model["embedding"]["filename"] == "embed.genai.onnx"
        assert model["vision"]["config_filename"] == "genai_processor_config.json"
        assert model["vision"]["filename"] == "vision.genai.onnx"
        transforms = json.loads((out / "genai_processor_config.json").read_text())["processor"]["transforms"]
        resize = next(t["operation"]["attrs"] for t in transforms if t["operation"]["type"] == "Resize")
        preprocessor = json.loads((export / "preprocessor_config.json").read_text())
        assert (resize["min_pixels"], resize["max_pixels"]) == (preprocessor["size"]["shortest_edge"], preprocessor["size"]["longest_edge"])
        library = model["decoder"]["session_options"].get("custom_ops_library")
        if name == "dense" or not native.available():
            assert library is None
        else:
            assert library == native.library_path().name and (out / library).is_file()


def test_embedding_wrapper_writes_the_features_at_the_image_tokens(vlm):
    export, out = vlm["export"], vlm["dense"]
    image_token = json.loads((export / "template.json").read_text())["image_token_id"]
    wrapped, source = session(str(out / "embed.genai.onnx")), session(str(export / "embed.onnx"))
    ids = np.array([[5, image_token, image_token, 9, image_token, 7]], np.int64)
    features = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = run(source, {"input_ids": ids})[0]
    want[0, [1, 2, 4]] = features
    np.testing.assert_array_equal(run(wrapped, {"input_ids": ids, "image_features": features})[0], want)
    # a decode step: no image token, genai's [0, hidden] features
    text = np.array([[11]], np.int64)
    np.testing.assert_array_equal(run(wrapped, {"input_ids": text, "image_features": np.zeros((0, 64), np.float32)})[0],
                                  run(source, {"input_ids": text})[0])


def test_decoder_wrapper_computes_the_spans_from_the_ids(vlm):
    """language_model.genai.onnx on input_ids equals the compiled graph on explicit
    image_spans: the prompt (two images), then decode steps (no span, as genai feeds them)."""
    export = vlm["export"]
    template = json.loads((export / "template.json").read_text())
    start, end, image = template["image_start_id"], template["image_end_id"], template["image_token_id"]
    ids = np.array([[5, start, image, image, end, 9, start, image, image, image, end, 7]], np.int64)
    spans = np.array([[1, 5], [6, 11]], np.int64)
    wrapped, compiled = session(str(vlm["sparse"] / "language_model.genai.onnx")), session(str(vlm["sparse_lm"]))
    rng = np.random.default_rng(2)
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, KV_HEADS, 0, 16), np.float32) for i in range(LAYERS) for kv in ("key", "value")}
    past_w = dict(past)
    for step, (tokens, want_spans) in enumerate([(ids, spans), (np.array([[3]]), np.zeros((0, 2), np.int64)),
                                                 (np.array([[4]]), np.zeros((0, 2), np.int64))]):
        s = tokens.shape[1]
        total = ids.shape[1] + (step if step else 0)
        feeds = {"inputs_embeds": rng.standard_normal((1, s, 64)).astype(np.float32),
                 "position_ids": np.broadcast_to(np.arange(total - s, total), (3, 1, s)).astype(np.int64),
                 "attention_mask": np.ones((1, total), np.int64)}
        want = run(compiled, {**feeds, **past, "image_spans": want_spans})
        got = run(wrapped, {**feeds, **past_w, "input_ids": tokens})
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
        names = [o.name.replace("present", "past_key_values") for o in compiled.get_outputs()][1:]
        past, past_w = dict(zip(names, want[1:])), dict(zip(names, got[1:]))


def test_external_data_is_linked_beside_the_wrappers(vlm, tmp_path):
    """Real exports keep their weights in external data: the folder holds those
    files and the wrappers' references to them resolve."""
    import onnx

    from blindsight.compiler.genai_vlm import write_genai_vlm

    export = tmp_path / "export"
    shutil.copytree(vlm["export"], export)
    for name in ("vision", "embed", "language_model"):
        model = onnx.load(str(export / f"{name}.onnx"))
        onnx.save(model, str(export / f"{name}.onnx"), save_as_external_data=True, location=f"{name}.onnx.data",
                  size_threshold=256)
    out = write_genai_vlm(export, vlm["root"] / "sparse.json",
                          tmp_path / "genai", native=False).out_dir
    assert {"vision.onnx.data", "embed.onnx.data", "language_model.onnx.data"} <= {p.name for p in out.iterdir()}
    t = json.loads((export / "template.json").read_text())
    ids = np.array([[5, t["image_start_id"], t["image_token_id"], t["image_token_id"], t["image_end_id"], 9]], np.int64)
    feeds = {"input_ids": ids, "image_features": np.ones((2, 64), np.float32),
             "inputs_embeds": np.random.default_rng(3).standard_normal((1, 6, 64)).astype(np.float32),
             "position_ids": np.broadcast_to(np.arange(6), (3, 1, 6)).astype(np.int64), "attention_mask": np.ones((1, 6), np.int64),
             **{f"past_key_values.{i}.{kv}": np.zeros((1, KV_HEADS, 0, 16), np.float32) for i in range(LAYERS) for kv in ("key", "value")}}
    for graph in ("embed.genai.onnx", "language_model.genai.onnx"):
        for got, want in zip(run(session(str(out / graph)), feeds), run(session(str(vlm["sparse"] / graph)), feeds)):
            np.testing.assert_array_equal(got, want)
    pixels = {"pixel_values": np.ones((24, 1176), np.float32), "image_grid_thw": np.array([[1, 4, 6]], np.int64)}
    np.testing.assert_array_equal(run(session(str(out / "vision.genai.onnx")), pixels)[0],
                                  run(session(str(vlm["sparse"] / "vision.genai.onnx")), pixels)[0])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 6, 4), (2, 4, 4), (1, 8, 8), (1, 18, 10), (1, 16, 16)])
def test_vision_wrapper_equals_the_tower_fed_its_index_inputs(tmp_path_factory, family, grid):
    """vision.genai.onnx on (pixel_values, image_grid_thw) equals the export's
    vision.onnx fed the index inputs that blindsight.vision_inputs computes (equal to
    transformers' own, tests/test_runtime_no_torch.py): one and two frames, Qwen2.5-VL's
    windows (56 px: 2 merged tokens a side) fitting exactly, padded, and over
    several windows in both directions."""
    from blindsight.compiler.genai_vlm import _load, vision_wrapper
    from blindsight.vision_inputs import qwen_vision_feeds

    export = _tiny_export(tmp_path_factory, family)
    template = json.loads((export / "template.json").read_text())
    wrapped = tmp_path_factory.mktemp("wrapped") / "vision.genai.onnx"
    import onnx

    onnx.save(vision_wrapper(_load(export / "vision.onnx"), template), str(wrapped))
    pixels = np.random.default_rng(sum(grid)).standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
    thw = np.array([grid], np.int64)
    feeds = qwen_vision_feeds(family, template["vision"], pixels, thw)
    want = run(session(str(export / "vision.onnx")), {k: feeds[k] for k in template["vision_inputs"]})[0]
    got = run(session(str(wrapped)), {"pixel_values": pixels, "image_grid_thw": thw})[0]
    np.testing.assert_array_equal(got, want)


_EXPORTS: dict = {}


def _tiny_export(tmp_path_factory, family):
    if family not in _EXPORTS:
        from blindsight.models.checkpoints import make_tiny_checkpoint
        from blindsight.models.export_vlm import export_vlm

        root = tmp_path_factory.mktemp(f"tiny_{family}")
        _EXPORTS[family] = export_vlm(make_tiny_checkpoint(family, root / "checkpoint", seed=5), root / "export").out_dir
    return _EXPORTS[family]


def _genai_run(folder: Path, images: list[Path]):
    """genai's greedy tokens, and its processor's output as a Prompt for the reference;
    genai gets the processor's output alone (the folder's tower computes its index inputs)."""
    import onnxruntime_genai as og

    from blindsight.runtime.prompt import Prompt

    model = og.Model(str(folder))
    processor = model.create_multimodal_processor()
    assert json.loads((folder / "genai_config.json").read_text())["model"]["vision"]["filename"] == "vision.genai.onnx"

    def text(n):
        return ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * n
                + "What is in the picture?<|im_end|>\n<|im_start|>assistant\n")

    inputs = processor(text(len(images)), images=og.Images.open(*map(str, images)))
    # the reference's pixels: genai's processor on each image alone, back to back
    pixels = np.concatenate([processor(text(1), images=og.Images.open(str(i)))["pixel_values"].as_numpy() for i in images])
    prompt = Prompt(inputs["input_ids"].as_numpy().reshape(-1).astype(np.int64), pixels,
                    inputs["image_grid_thw"].as_numpy(), text(len(images)), len(images))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.input_ids.size + NEW_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, prompt


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed (pip install 'blindsight-ort[genai]')")
def test_onnxruntime_genai_runs_the_vlm_like_the_source_graphs(vlm):
    """Greedy tokens of genai on the written folders: all-dense equals the source
    graphs; the sparse profile equals the project's pipeline on the same compiled
    graph with explicit spans, and changes the tokens of at least one prompt;
    zeroing the image features changes the tokens (the images reach the decoder)."""
    from blindsight.runtime.pipeline import Pipeline

    root = vlm["root"]
    source = Pipeline(vlm["export"], compiled=False, native=False)
    sparse = Pipeline(vlm["export"], compiled=vlm["sparse_lm"])  # the native kernel when built, as the genai folder
    sparse_changes = False
    for label, names in PROMPTS.items():
        images = [root / n for n in names]
        dense_tokens, prompt = _genai_run(vlm["dense"], images)
        assert prompt.image_grid_thw.tolist() == [[1, IMAGES[n][0] // 14, IMAGES[n][1] // 14] for n in names], label
        assert len(dense_tokens) == NEW_TOKENS, label
        assert dense_tokens == source.generate_from(prompt, NEW_TOKENS).token_ids, label
        sparse_tokens, sparse_prompt = _genai_run(vlm["sparse"], images)
        np.testing.assert_array_equal(sparse_prompt.input_ids, prompt.input_ids)
        assert sparse_tokens == sparse.generate_from(prompt, NEW_TOKENS).token_ids, label
        sparse_changes |= sparse_tokens != dense_tokens
        blind = Pipeline(vlm["export"], compiled=False, native=False)
        blind.image_features = lambda p: np.zeros((int(np.sum(p.input_ids == blind.template["image_token_id"])), 64), np.float32)
        assert blind.generate_from(prompt, NEW_TOKENS).token_ids != dense_tokens, label
    assert sparse_changes


def _assert_clean_failure(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bs_compile_genai_bad_input_is_one_line(vlm, tmp_path):
    export = vlm["export"]
    save(Profile.uniform("dense", LAYERS, HEADS, num_kv_heads=KV_HEADS), tmp_path / "p.json")
    prof = ("--profile", tmp_path / "p.json")
    gemma = tmp_path / "gemma3_export"
    shutil.copytree(export, gemma)
    template = json.loads((gemma / "template.json").read_text())
    (gemma / "template.json").write_text(json.dumps({**template, "family": "gemma3"}))
    plain = tmp_path / "plain"
    plain.mkdir()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    cases = [
        ((plain, "--genai", *prof, "-o", out), "not one"),
        ((export, "--genai", *prof), "pass -o OUT_DIR"),
        ((export, *prof, "-o", out), "pass --genai"),
        ((gemma, "--genai", *prof, "-o", out), "gemma3", "qwen2_5_vl, qwen2_vl"),
        ((export, "--genai", *prof, "-o", taken), "--overwrite"),
        ((export, "--genai", *prof, "-o", export / "inside"), "inside it"),
        ((export, "--genai", "--profile", vlm["root"] / "missing.json", "-o", out), "missing.json"),
    ]
    for args, *needles in cases:
        _assert_clean_failure(bs_compile(*args), *needles)
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not (export / "inside").exists()
    assert (taken / "notes.txt").read_text() == "mine" and list(plain.iterdir()) == []
    assert _tree(export) == vlm["before"]
    r = bs_compile(export, "--genai", *prof, "-o", taken, "--overwrite", "--no-native")
    assert r.returncode == 0, r.stderr
    assert not (taken / "notes.txt").exists() and (taken / "language_model.genai.onnx").is_file()


@pytest.fixture(scope="module")
def qwen2_vlm(tmp_path_factory):
    """A tiny Qwen2-VL export (its tower takes no window index) as genai folders:
    all-dense on the function bodies, and a sparse profile."""
    from PIL import Image

    from blindsight.compiler.genai_vlm import write_genai_vlm
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp("genai_qwen2_vl")
    export = export_vlm(make_tiny_checkpoint("qwen2_vl", root / "checkpoint", seed=3), root / "export").out_dir
    rng = np.random.default_rng(1)
    for name, (h, w) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    sparse = Profile([[("sink", "intra", "sink", "intra_sink")[(h + layer) % 4] for h in range(HEADS)]
                      for layer in range(LAYERS)], num_kv_heads=KV_HEADS)
    write_genai_vlm(export, Profile.uniform("dense", LAYERS, HEADS, num_kv_heads=KV_HEADS), root / "dense", native=False)
    write_genai_vlm(export, sparse, root / "sparse")
    sparse_lm = compile_model(export / "language_model.onnx", sparse, root / "lm.sparse.onnx").output
    return dict(root=root, export=export, dense=root / "dense", sparse=root / "sparse", sparse_lm=sparse_lm)


def test_qwen2_vl_export_is_written_under_genais_qwen2_5_vl_type(qwen2_vlm):
    template = json.loads((qwen2_vlm["export"] / "template.json").read_text())
    assert template["family"] == "qwen2_vl" and "window_index" not in template["vision_inputs"]
    config = json.loads((qwen2_vlm["dense"] / "genai_config.json").read_text())
    assert config["model"]["type"] == "qwen2_5_vl"
    assert config["model"]["vision"]["filename"] == "vision.genai.onnx"


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed (pip install 'blindsight-ort[genai]')")
def test_onnxruntime_genai_runs_a_qwen2_vl_export_like_the_source_graphs(qwen2_vlm):
    """genai's qwen2_5_vl type on a Qwen2-VL export: its processor, position ids and
    pipeline give the tokens of the project's Pipeline on the source graphs
    (all-dense) and on the compiled graph (sparse), for one and for two images."""
    from blindsight.runtime.pipeline import Pipeline

    root = qwen2_vlm["root"]
    source = Pipeline(qwen2_vlm["export"], compiled=False, native=False)
    sparse = Pipeline(qwen2_vlm["export"], compiled=qwen2_vlm["sparse_lm"])
    sparse_changes = False
    for label, names in PROMPTS.items():
        images = [root / n for n in names]
        dense_tokens, prompt = _genai_run(qwen2_vlm["dense"], images)
        assert len(dense_tokens) == NEW_TOKENS, label
        assert dense_tokens == source.generate_from(prompt, NEW_TOKENS).token_ids, label
        sparse_tokens, _ = _genai_run(qwen2_vlm["sparse"], images)
        assert sparse_tokens == sparse.generate_from(prompt, NEW_TOKENS).token_ids, label
        sparse_changes |= sparse_tokens != dense_tokens
    assert sparse_changes


def test_add_vision_inputs_unpads_genais_pixels_for_a_tower_fed_index_inputs():
    """For a tower that takes the index inputs, genai's padded pixel_values (each
    image's patches padded to the largest image's count) become the images' rows
    back to back, and the index inputs are those of the grid; a folder whose tower
    computes them itself gets its inputs back unchanged."""
    from blindsight.runtime.genai import add_vision_inputs
    from blindsight.vision_inputs import qwen_vision_feeds

    rng = np.random.default_rng(4)
    grid = np.array([[1, 4, 4], [1, 6, 4], [1, 2, 4]], np.int64)
    images = [rng.standard_normal((int(np.prod(g)), 1176)).astype(np.float32) for g in grid]
    largest = max(len(i) for i in images)
    padded = np.zeros((largest * len(images), 1176), np.float32)
    for k, rows in enumerate(images):
        padded[k * largest:k * largest + len(rows)] = rows
    template = {"family": "qwen2_vl", "vision": {"spatial_merge_size": 2, "patch_size": 14, "window_size": 0},
                "vision_inputs": ["pixel_values", "vision_position_ids", "cu_seqlens"]}
    inputs = add_vision_inputs({"pixel_values": padded, "image_grid_thw": grid}, template)
    np.testing.assert_array_equal(inputs["pixel_values"], np.concatenate(images))
    want = qwen_vision_feeds("qwen2_vl", template["vision"], np.concatenate(images), grid)
    for name in ("vision_position_ids", "cu_seqlens"):
        np.testing.assert_array_equal(inputs[name], want[name])
    assert inputs["cu_seqlens"][-1] == sum(len(i) for i in images)
    untouched = add_vision_inputs({"pixel_values": padded, "image_grid_thw": grid}, {**template, "vision_index_in_graph": True})
    assert set(untouched) == {"pixel_values", "image_grid_thw"} and untouched["pixel_values"] is padded
