"""bs-export --dtype: fp16 exports of tiny Qwen2-VL, Qwen2.5-VL and
Gemma 3 checkpoints equal the torch fp16 model, their float inputs and outputs are
float16 (integer inputs stay int64), Gemma 3's upcasting RMSNorm loads in ONNX Runtime
at opset 23, bf16 exports pass the ONNX checker, and the runtime pipeline runs an
fp16 export.

Tolerances: fp16 keeps 11 significant bits (relative step 2^-11 ~ 4.9e-4). ONNX
Runtime and torch round different intermediates to fp16 (torch's CPU fp16 matmul
and softmax accumulate in fp32 and round once; the ONNX graph rounds each op's
output), so results agree to a few fp16 steps of the output's magnitude, not
bit for bit. Each comparison is ``atol = REL * max|torch|`` with REL = 1e-2 (~20
fp16 steps: two decoder layers, ~10 rounded ops in a row); the measured errors
are a fraction of that (docs/export-contract.md lists them).
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from _util import run, session
from blindsight.families import FAMILIES

REL = 1e-2
PREFILL, STEPS = 12, 3
FLOAT16, INT64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64


def _export(tmp_path_factory, family, dtype):
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp(f"{dtype}_{family}")
    ckpt = make_tiny_checkpoint(family, root / "checkpoint", seed=3)
    return ckpt, export_vlm(ckpt, root / "export", dtype=dtype, logits="all").out_dir  # top-1 over every position


@pytest.fixture(scope="module", params=FAMILIES)
def fp16(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    ckpt, out = _export(tmp_path_factory, request.param, "fp16")
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, local_files_only=True, attn_implementation="eager", dtype=torch.float16).eval()
    return request.param, out, json.loads((out / "template.json").read_text()), model


def _close(got, want):
    want = want.float().numpy() if isinstance(want, torch.Tensor) else want
    assert got.dtype == np.float16 and got.shape == want.shape
    err = np.abs(got.astype(np.float32) - want.astype(np.float32)).max()
    assert err <= REL * np.abs(want).max(), (err, np.abs(want).max())


def _elem_types(values):
    return {v.name: v.type.tensor_type.elem_type for v in values}


def test_fp16_graphs_have_fp16_float_inputs_and_outputs(fp16):
    family, out, template, _ = fp16
    assert template["dtype"] == "float16"
    for name in template["files"].values():
        graph = onnx.load(str(out / name)).graph
        types = {**_elem_types(graph.input), **_elem_types(graph.output)}
        ints = {"input_ids", "position_ids", "attention_mask", "token_type_ids", *template["vision_inputs"][1:]}
        assert {n: t for n, t in types.items() if n in ints} == dict.fromkeys(ints & set(types), INT64), name
        assert {n: t for n, t in types.items() if n not in ints} == dict.fromkeys(set(types) - ints, FLOAT16), name
        assert not {i.data_type for i in graph.initializer} & {onnx.TensorProto.DOUBLE}


def _positions(family, start, length):
    pos = np.arange(start, start + length, dtype=np.int64)[None]
    return pos if family == "gemma3" else np.broadcast_to(pos, (3, 1, length)).copy()


def _lm_feeds(template, embeds, past_len, presents):
    feeds = {"inputs_embeds": embeds, "position_ids": _positions(template["family"], past_len, embeds.shape[1]),
             "attention_mask": np.ones((1, past_len + embeds.shape[1]), dtype=np.int64),
             "token_type_ids": np.zeros((1, embeds.shape[1]), dtype=np.int64)}  # Gemma 3; no image here
    for i in range(2 * template["num_layers"]):
        name = f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}"
        feeds[name] = presents[i] if presents else np.zeros((1, template["num_kv_heads"], 0, template["head_dim"]), np.float16)
    return feeds


def test_fp16_language_model_prefill_and_cache_step_equal_torch(fp16):
    family, out, template, model = fp16
    embeds = np.random.default_rng(0).standard_normal((1, PREFILL + STEPS, template["hidden_size"])).astype(np.float16)
    sess = session(str(out / "language_model.onnx"))
    prefill = run(sess, _lm_feeds(template, embeds[:, :PREFILL], 0, None))
    step = run(sess, _lm_feeds(template, embeds[:, PREFILL:], PREFILL, prefill[1:]))  # a 3-token continuation
    seq = PREFILL + STEPS
    with torch.no_grad():
        lm = model.model.language_model
        hidden = lm(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(_positions(family, 0, seq)),
                    attention_mask=torch.ones(1, seq, dtype=torch.int64), use_cache=True)
        want = model.lm_head(hidden.last_hidden_state)
    _close(prefill[0], want[:, :PREFILL])
    _close(step[0], want[:, PREFILL:])
    for i, present in enumerate(step[1:]):  # the cache after the step: the whole sequence's keys and values
        layer = hidden.past_key_values.layers[i // 2]
        want = layer.values if i % 2 else layer.keys
        assert present.shape[2] == seq
        _close(present[:, :, seq - want.shape[2]:], want)  # transformers keeps only a sliding layer's window


def test_fp16_vision_and_embed_equal_torch(fp16):
    family, out, template, model = fp16
    from blindsight.models.export_vision import qwen_vision_feeds

    rng = np.random.default_rng(1)
    if family == "gemma3":
        size = template["vision"]["image_size"]
        feeds = {"pixel_values": rng.standard_normal((3, 3, size, size)).astype(np.float16)}
        with torch.no_grad():
            want = model.model.get_image_features(torch.from_numpy(feeds["pixel_values"])).pooler_output
    else:
        grid = np.array([[1, 4, 4], [1, 8, 8], [1, 4, 6]], dtype=np.int64)
        v = template["vision"]
        pixels = rng.standard_normal((int(grid.prod(-1).sum()), 3 * v["temporal_patch_size"] * v["patch_size"] ** 2))
        feeds = qwen_vision_feeds(family, v, pixels, grid)
        feeds["pixel_values"] = feeds["pixel_values"].astype(np.float16)
        with torch.no_grad():
            parts = model.model.get_image_features(torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(grid))
            want = torch.cat(parts.pooler_output)
    _close(run(session(str(out / "vision.onnx")), feeds)[0], want)

    ids = rng.integers(0, template["vocab_size"], size=(2, 9))
    with torch.no_grad():
        want = model.get_input_embeddings()(torch.from_numpy(ids))
    np.testing.assert_array_equal(run(session(str(out / "embed.onnx")), {"input_ids": ids})[0], want.numpy())


def test_pipeline_runs_an_fp16_export(fp16):
    from PIL import Image

    from blindsight.runtime.pipeline import Pipeline

    family, out, _, _ = fp16
    pipe = Pipeline(out, compiled=False, threads=2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((56, 56))
    result = pipe.generate([image], "<image>describe", max_new_tokens=3)
    assert len(result.image_spans) == 1 and 1 <= len(result.token_ids) <= 3


def test_gemma3_fp16_upcasting_norm_runs_at_opset_23(tmp_path):
    """At opset 23 Gemma's x.float() RMSNorm becomes RMSNormalization(X fp16, scale fp32), which
    ONNX Runtime refuses unless X is cast first (blindsight.models.dtype.cast_mixed_norms)."""
    from blindsight.models.configs import tiny_config
    from blindsight.models.export import example_inputs, export_language_model, load_language_model

    path = export_language_model("gemma3", "attention_op", tmp_path / "lm.onnx", dtype="fp16")
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    norms = [n for n in graph.node if n.op_type == "RMSNormalization"]
    assert norms and all(producers[n.input[0]].op_type == "Cast" for n in norms)
    feeds = example_inputs("gemma3", tiny_config("gemma3"), seq_len=10)
    feeds["inputs_embeds"] = feeds["inputs_embeds"].astype(np.float16)
    got = run(session(str(path)), feeds)[0]
    model = load_language_model("gemma3", tiny_config("gemma3"), "sdpa").to(torch.float16)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[n]) for n in ("inputs_embeds", "position_ids", "attention_mask")))
    _close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_exports_pass_the_onnx_checker(family, tmp_path_factory):
    _, out = _export(tmp_path_factory, family, "bf16")
    assert json.loads((out / "template.json").read_text())["dtype"] == "bfloat16"
    for name in ("vision.onnx", "embed.onnx", "language_model.onnx"):
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model, full_check=True)  # with type inference: every op accepts bfloat16
        assert _elem_types(model.graph.output)[model.graph.output[0].name] == onnx.TensorProto.BFLOAT16


def test_pipeline_refuses_bf16_with_a_reason():
    from blindsight.errors import BlindSightError
    from blindsight.runtime.pipeline import float_dtype

    assert float_dtype({}) == np.float32 and float_dtype({"dtype": "float16"}) == np.float16
    with pytest.raises(BlindSightError, match="bfloat16.*--dtype"):
        float_dtype({"dtype": "bfloat16"})


def test_bs_export_rejects_an_unknown_dtype(tmp_path):
    res = subprocess.run([sys.executable, "-m", "blindsight.models.cli", str(tmp_path), "-o", str(tmp_path / "o"),
                          "--dtype", "fp8"], capture_output=True, text=True)
    assert res.returncode == 2 and "fp16" in res.stderr


# ---------------------------------------------------------------- compiling the fp16 exports


def _compile(out, tmp_path, layers, lowering):
    from blindsight.compiler.pipeline import compile_model
    from blindsight.profile import Profile

    src = out / "language_model.onnx"
    dst = out / f"lm.{lowering}.{abs(hash(str(layers))) % 10**8}.onnx"  # beside the export: external data stays valid
    compile_model(src, Profile(layers), dst, lowering)
    return src, dst


def _layers(template, mixed):
    from blindsight.profile import Profile

    n, h = int(template["num_layers"]), int(template["num_heads"])
    return Profile.mixed(n, h, rotate=True).layers if mixed else [["dense"] * h for _ in range(n)]


# An all-dense compile runs GroupQueryAttention where the export runs its own
# fp16 attention ops: two fp16 computations of the same attention, each off the
# exact value by its own roundings (about 5e-3 relative to the largest logit
# against torch for these exports, measured), so they may differ by twice
# that; 2e-2 (relative to max(|x|, 1), bs-check's measure) leaves room, while a
# sparse head or a changed weight moves logits by far more. The fp32 export is
# the independent reference: the compile must not be less accurate than the
# fp16 export itself.
FP16_COMPILE_TOL = 2e-2


@pytest.mark.parametrize("past", [0, 3])
def test_fp16_all_dense_compile_equals_the_fp16_export(fp16, tmp_path, past):
    """docs/specification.md §4: an all-dense compile equals its source, within fp16 rounding."""
    from blindsight.runtime.parity import check

    family, out, template, _ = fp16
    src, dst = _compile(out, tmp_path, _layers(template, mixed=False), "fast")
    report = check(src, dst, seq_len=20, past=past, images=2, tolerance=FP16_COMPILE_TOL)
    assert report.mode == "dense" and report.passed, report.table()
    logits = next(o for o in report.outputs if o.name == "logits")
    assert logits.dtype == "float16" and logits.top1 >= 0.9, report.table()


def test_fp16_compile_is_as_accurate_as_the_fp16_export(fp16, tmp_path_factory, tmp_path):
    from blindsight.runtime.parity import random_feeds, _read_graph

    family, out, template, _ = fp16
    _, out32 = _export(tmp_path_factory, family, "fp32")
    src, dst = _compile(out, tmp_path, _layers(template, mixed=False), "fast")
    inputs = _read_graph(out32 / "language_model.onnx")[0]
    feeds32 = random_feeds(inputs, batch=1, seq_len=20, past=0, seed=5)
    feeds16 = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds32.items()}
    exact = run(session(str(out32 / "language_model.onnx")), feeds32)[0]
    feeds16["image_spans"] = np.array([[2, 9]], dtype=np.int64)
    export_err = np.abs(run(session(str(src)), feeds16)[0].astype(np.float64) - exact).max()
    compiled_err = np.abs(run(session(str(dst)), feeds16)[0].astype(np.float64) - exact).max()
    assert compiled_err <= 2 * export_err + 1e-3, (compiled_err, export_err)


@pytest.mark.parametrize("past", [0, 3])
def test_fp16_sparse_fast_equals_sparse_reference(fp16, tmp_path, past):
    from blindsight.runtime.parity import check

    family, out, template, _ = fp16
    layers = _layers(template, mixed=True)
    _, ref = _compile(out, tmp_path, layers, "reference")
    _, fast = _compile(out, tmp_path, layers, "fast")
    report = check(ref, fast, seq_len=24, past=past, images=2)
    assert report.mode == "lowering" and report.passed, report.table()


def test_fp16_compiled_bodies_are_fp16(fp16, tmp_path):
    family, out, template, _ = fp16
    _, dst = _compile(out, tmp_path, _layers(template, mixed=True), "fast")
    model = onnx.load(str(dst))
    types = set()

    def walk(graph):
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in (onnx.TensorProto.FLOAT, FLOAT16, onnx.TensorProto.BFLOAT16):
                    types.add(a.t.data_type)
                if n.op_type == "Cast" and a.name == "to" and a.i in (onnx.TensorProto.FLOAT, FLOAT16):
                    types.add(a.i)
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    for f in model.functions:
        walk(f)
    assert types == {FLOAT16}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_exports_compile_to_checked_bf16_graphs(family, tmp_path_factory, tmp_path):
    """bf16 runs only on GPU providers (no bf16 CPU kernels); the compiled graph must still be valid ONNX."""
    _, out = _export(tmp_path_factory, family, "bf16")
    template = json.loads((out / "template.json").read_text())
    for lowering in ("fast", "reference"):
        _, dst = _compile(out, tmp_path, _layers(template, mixed=True), lowering)
        onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
