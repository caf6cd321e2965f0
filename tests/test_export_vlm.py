"""bs-export on tiny random Qwen2-VL, Qwen2.5-VL and Gemma 3 checkpoints: the
exported graphs equal the torch modules, the KV cache continues a prefill, and
a compiled language model keeps its cache."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from _util import run, session
from blindsight.compiler.pipeline import compile_model
from blindsight.models.configs import FAMILIES
from blindsight.profile import Profile

PREFILL = 12
SPANS = np.array([[1, 5], [6, 10]], dtype=np.int64)  # two "images" inside a 12-token prompt
DECODE_STEPS = 3
_CACHE = {}


def _export(family, tmp_path_factory, logits="all"):
    """Most tests compare every position with transformers: logits="all"."""
    if (family, logits) not in _CACHE:
        from blindsight.models.checkpoints import make_tiny_checkpoint
        from blindsight.models.export_vlm import export_vlm

        root = tmp_path_factory.mktemp(f"vlm_{family}_{logits}")
        ckpt = make_tiny_checkpoint(family, root / "checkpoint", seed=3)
        out = export_vlm(ckpt, root / "export", logits=logits).out_dir
        _CACHE[family, logits] = (ckpt, out)
    return _CACHE[family, logits]


@pytest.fixture(params=FAMILIES)
def vlm(request, tmp_path_factory):
    family = request.param
    ckpt, out = _export(family, tmp_path_factory)
    return family, ckpt, out


def test_default_export_computes_the_last_positions_logits_of_the_full_graph(vlm, tmp_path_factory):
    """bs-export's default runs the LM head on each chunk's last position only:
    prefill and decode logits equal the last column of the every-position graph,
    and the KV cache is the same."""
    family, _, full = vlm
    _, last = _export(family, tmp_path_factory, logits="last")
    template = json.loads((last / "template.json").read_text())
    assert template["logits"] == "last" and json.loads((full / "template.json").read_text())["logits"] == "all"
    embeds = _embeds(template, seed=4)
    want, want_presents = _generate(session(str(full / "language_model.onnx")), template, embeds)
    got_steps, got_presents = _generate(session(str(last / "language_model.onnx")), template, embeds, split=True)
    # one logits row per call: the prefill's last position, then each decode step's
    assert [g.shape[1] for g in got_steps] == [1] * (1 + DECODE_STEPS)
    np.testing.assert_allclose(got_steps[0], want[:, PREFILL - 1:PREFILL], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(got_steps[1:], axis=1), want[:, PREFILL:], atol=1e-5, rtol=0)
    for step_got, step_want in zip(got_presents, want_presents):
        for g, w in zip(step_got, step_want):
            np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def _torch_model(ckpt):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(ckpt, local_files_only=True, attn_implementation="eager", dtype=torch.float32).eval()


def _positions(family, start, length):
    pos = np.arange(start, start + length, dtype=np.int64)[None]
    return np.broadcast_to(pos, (3, 1, length)).copy() if family != "gemma3" else pos


def _torch_logits(model, family, embeds):
    """Logits of the whole sequence in one forward pass, no cache: the reference."""
    seq = embeds.shape[1]
    lm = model.model.language_model
    with torch.no_grad():
        hidden = lm(
            inputs_embeds=torch.from_numpy(embeds),
            position_ids=torch.from_numpy(_positions(family, 0, seq)),
            attention_mask=torch.ones(1, seq, dtype=torch.int64),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden).numpy()


def _lm_feeds(template, embeds, past_len, presents=None):
    seq = embeds.shape[1]
    feeds = {
        "inputs_embeds": embeds,
        "position_ids": _positions(template["family"], past_len, seq),
        "attention_mask": np.ones((1, past_len + seq), dtype=np.int64),
        "token_type_ids": np.zeros((1, seq), dtype=np.int64),  # Gemma 3 only (run() drops it elsewhere); no image here
    }
    for i in range(template["num_layers"]):
        for j, kv in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{kv}"] = (
                presents[2 * i + j] if presents is not None
                else np.zeros((1, template["num_kv_heads"], 0, template["head_dim"]), dtype=np.float32)
            )
    return feeds


def _generate(sess, template, embeds, spans=None, split=False):
    """Prefill embeds[:, :PREFILL], then one decode step per remaining token;
    returns the logits of every step (concatenated, or one array per call with
    ``split``) and the presents after each step."""
    logits, presents_per_step, presents = [], [], None
    steps = [(0, PREFILL)] + [(PREFILL + i, PREFILL + i + 1) for i in range(embeds.shape[1] - PREFILL)]
    for start, end in steps:
        feeds = _lm_feeds(template, embeds[:, start:end], start, presents)
        if spans is not None:
            feeds["image_spans"] = spans
        out = run(sess, feeds)
        logits.append(out[0])
        presents = out[1:]
        presents_per_step.append(presents)
    return (logits if split else np.concatenate(logits, axis=1)), presents_per_step


def _embeds(template, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, PREFILL + DECODE_STEPS, template["hidden_size"]), dtype=np.float32)


def test_export_directory_holds_the_contract(vlm):
    family, ckpt, out = vlm
    from transformers import AutoConfig, AutoTokenizer

    template = json.loads((out / "template.json").read_text())
    config = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    text = config.get_text_config()
    assert template["format"] == "blindsight-export" and template["family"] == family
    assert (template["num_layers"], template["num_heads"], template["num_kv_heads"], template["hidden_size"]) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.hidden_size)
    for name in template["files"].values():
        onnx.checker.check_model(str(out / name))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    start, end = ("<start_of_image>", "<end_of_image>") if family == "gemma3" else ("<|vision_start|>", "<|vision_end|>")
    assert tok.convert_tokens_to_ids([start, end]) == [template["image_start_id"], template["image_end_id"]]
    lm = onnx.load(str(out / "language_model.onnx"), load_external_data=False)
    inputs = [i.name for i in lm.graph.input]
    outputs = [o.name for o in lm.graph.output]
    n = template["num_layers"]
    assert inputs[:3] == ["inputs_embeds", "position_ids", "attention_mask"]
    blocks = ["token_type_ids"] if family == "gemma3" else []  # Gemma 3's bidirectional image blocks
    assert inputs[3:] == [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")] + blocks
    assert template["bidirectional_image_attention"] is (family == "gemma3")
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    if family == "gemma3":
        assert template["position_ids"] == "1d" and template["tokens_per_image"] == config.mm_tokens_per_image
    else:
        assert template["position_ids"] == "mrope3"
        assert template["mrope_section"] == text.rope_parameters["mrope_section"]


def test_vision_and_embed_equal_torch(vlm):
    family, ckpt, out = vlm
    from blindsight.models.export_vision import qwen_vision_feeds

    template = json.loads((out / "template.json").read_text())
    model = _torch_model(ckpt)
    rng = np.random.default_rng(1)
    if family == "gemma3":
        size = template["vision"]["image_size"]
        pixels = rng.standard_normal((3, 3, size, size), dtype=np.float32)
        feeds = {"pixel_values": pixels}
        with torch.no_grad():
            want = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    else:
        grid = np.array([[1, 4, 4], [1, 8, 8], [1, 4, 6]], dtype=np.int64)
        v = template["vision"]
        width = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
        pixels = rng.standard_normal((int(grid.prod(-1).sum()), width), dtype=np.float32)
        feeds = qwen_vision_feeds(family, v, pixels, grid)
        with torch.no_grad():
            parts = model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid)).pooler_output
            want = torch.cat(parts).numpy()
    got = run(session(str(out / "vision.onnx")), feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    ids = rng.integers(0, template["vocab_size"], size=(2, 9))
    got = run(session(str(out / "embed.onnx")), {"input_ids": ids})[0]
    with torch.no_grad():
        want = model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_kv_cache_continuation_equals_torch(vlm):
    family, ckpt, out = vlm
    template = json.loads((out / "template.json").read_text())
    embeds = _embeds(template)
    got, presents = _generate(session(str(out / "language_model.onnx")), template, embeds)
    want = _torch_logits(_torch_model(ckpt), family, embeds)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert presents[-1][0].shape == (1, template["num_kv_heads"], PREFILL + DECODE_STEPS, template["head_dim"])


def _profile(template, layers):
    return Profile(layers, num_kv_heads=template["num_kv_heads"], sink_tokens=1)


def test_compiled_language_model_keeps_its_kv_cache(vlm, tmp_path):
    family, _, out = vlm
    template = json.loads((out / "template.json").read_text())
    n, h = template["num_layers"], template["num_heads"]
    src = out / "language_model.onnx"
    embeds = _embeds(template, seed=2)
    dense_sess = session(str(src))
    want, want_presents = _generate(dense_sess, template, embeds)

    # all-dense profile: logits and the KV cache are the dense model's
    dense_out = tmp_path / "dense.onnx"
    result = compile_model(src, _profile(template, [["dense"] * h] * n), dense_out, "fast")
    assert result.num_nodes == n
    compiled = onnx.load(str(dense_out))
    assert [x.op_type for x in compiled.graph.node].count("BlindSightAttention") == n
    got, got_presents = _generate(session(str(dense_out)), template, embeds, SPANS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for step_got, step_want in zip(got_presents, want_presents):
        # layer 0's cache does not depend on attention: bit-identical
        np.testing.assert_array_equal(step_got[0], step_want[0])
        np.testing.assert_array_equal(step_got[1], step_want[1])
        for g, w in zip(step_got, step_want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)

    # a sparse profile: fast == reference lowering through prefill and decode
    cats = ["dense", "sink", "intra", "intra_sink"]
    layers = [[cats[(i + j) % 4] for j in range(h)] for i in range(n)]
    runs = {}
    for lowering in ("fast", "reference"):
        path = tmp_path / f"sparse_{lowering}.onnx"
        compile_model(src, _profile(template, layers), path, lowering)
        runs[lowering] = _generate(session(str(path)), template, embeds, SPANS)
    np.testing.assert_allclose(runs["fast"][0], runs["reference"][0], atol=1e-4, rtol=0)
    for step_fast, step_ref in zip(runs["fast"][1], runs["reference"][1]):
        for f, r in zip(step_fast, step_ref):
            np.testing.assert_allclose(f, r, atol=1e-4, rtol=0)
    assert np.abs(runs["fast"][0][:, :PREFILL] - want[:, :PREFILL]).max() > 1e-3  # the profile did change the prefill

    # docs/specification.md §2: a decode step's text query is dense, so from the compiled prefill's
    # cache the dense model predicts the same next-token logits
    prefill_presents = runs["fast"][1][0]
    step = _lm_feeds(template, embeds[:, PREFILL:PREFILL + 1], PREFILL, prefill_presents)
    dense_step = run(dense_sess, step)[0]
    np.testing.assert_allclose(runs["fast"][0][:, PREFILL:PREFILL + 1], dense_step, atol=1e-4, rtol=0)


def _bs_export(*args):
    return subprocess.run([sys.executable, "-m", "blindsight.models.cli", *map(str, args)], capture_output=True, text=True)


def test_bs_export_bad_input_is_one_line(tmp_path):
    missing = _bs_export(tmp_path / "nope", "-o", tmp_path / "out")
    assert missing.returncode == 2 and "config.json" in missing.stderr and "Traceback" not in missing.stderr
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    wrong = _bs_export(text_only, "-o", tmp_path / "out")
    assert wrong.returncode == 2 and "gemma3_text" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    (text_only / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    taken = _bs_export(text_only, "-o", busy)
    assert taken.returncode == 2 and "--overwrite" in taken.stderr
    assert (busy / "keep.txt").read_text() == "x" and not list(tmp_path.glob(".busy*"))


def test_a_real_vocabulary_embedding_is_written_as_external_data(tmp_path):
    """Above 64 MiB the table goes to external data (ONNX Runtime maps it: a prompt pages in its
    tokens' rows only); the graph still gives the table's rows."""
    from blindsight.models.export_vision import EMBED_EXTERNAL_BYTES, export_embed

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(EMBED_EXTERNAL_BYTES // (4 * 256) + 1, 256)

        def get_input_embeddings(self):
            return self.table

    model = Model()
    path = export_embed(model, tmp_path / "embed.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert [t.name for t in proto.graph.initializer if t.external_data]
    assert path.stat().st_size < 1 << 20 and (tmp_path / "embed.onnx.data").stat().st_size >= EMBED_EXTERNAL_BYTES
    ids = np.array([[0, 5, model.table.num_embeddings - 1]], dtype=np.int64)
    got = run(session(str(path)), {"input_ids": ids})[0]
    np.testing.assert_array_equal(got, model.table.weight.detach().numpy()[ids])
