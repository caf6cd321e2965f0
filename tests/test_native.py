"""The native BlindSightAttention CPU kernel (blindsight.native) against the
numpy docs/specification.md §2 reference and the reference lowering (run on its function body),
on single nodes and on tiny families end to end.

The kernel must be built (``python -m blindsight.native build``, as the README's
test command does): without it these tests fail. ``BLINDSIGHT_NATIVE_TESTS=off``
is the one explicit opt-out (they are then skipped, reported as skipped)."""

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import EDGE_IDS, EDGE_TEMPLATES, category_lists, templates
from blindsight import native
from blindsight.attention import reference_attention
from blindsight.attention.schema import AttentionConfig
from blindsight.errors import BlindSightError
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.runtime.session import make_session

if os.environ.get("BLINDSIGHT_NATIVE_TESTS") == "off":
    pytest.skip("BLINDSIGHT_NATIVE_TESTS=off: native kernel tests opted out", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the native kernel is not built: run python -m blindsight.native build"


_SESSIONS: dict = {}


def sessions(cfg):
    """(native kernel, reference lowering on its function body) over one node."""
    if cfg not in _SESSIONS:
        model = single_node_model(cfg, "reference")
        nat = make_session(model, threads=2, native=True)
        assert nat.blindsight_native and nat.blindsight_attention.startswith("native kernel")
        ref = make_session(model, threads=2, native=False)
        assert not ref.blindsight_native
        _SESSIONS[cfg] = (nat, ref)
    return _SESSIONS[cfg]


def _run(sess, feeds):
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def check(cfg, spans, q_len, batch, seed, *, past=0, mask=None, d=8, atol=None, causal_ref=True):
    """Random Q/K/V; ``mask`` (bool [B or 1, 1, Sq, Skv]) is fed as the node's
    attn_mask (bool, or additive in the dtype) and given to the numpy reference."""
    rng = np.random.default_rng(seed)
    kv = past + q_len
    H, Hkv = cfg.num_heads, cfg.kv_num_heads
    dt = cfg.np_dtype
    q = rng.standard_normal((batch, H, q_len, d)).astype(dt)
    k = rng.standard_normal((batch, Hkv, kv, d)).astype(dt)
    v = rng.standard_normal((batch, Hkv, kv, d)).astype(dt)
    feeds = dict(query=q, key=k, value=v, image_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    if cfg.qkv_format == "BSD":
        feeds.update({n: x.transpose(0, 2, 1, 3).reshape(batch, x.shape[2], -1) for n, x in (("query", q), ("key", k), ("value", v))})
    if cfg.mask_type == "bool":
        feeds["attn_mask"] = mask
    elif cfg.mask_type == "float":
        feeds["attn_mask"] = np.where(mask, 0.0, -np.inf).astype(dt)
    want = reference_attention(q, k, v, feeds["image_spans"], cfg.categories, sink_tokens=cfg.sink_tokens,
                               scale=cfg.scale, model_mask=mask if cfg.mask_type != "none" else None,
                               causal=bool(cfg.is_causal) and causal_ref, window=cfg.local_window_size,
                               image_blocks=bool(cfg.image_blocks)).astype(np.float64)
    nat, ref = sessions(cfg)
    got, low = _run(nat, feeds), _run(ref, feeds)
    if cfg.qkv_format == "BSD":
        got, low = (x.reshape(batch, q_len, H, d).transpose(0, 2, 1, 3) for x in (got, low))
    assert got.dtype == dt and got.shape == want.shape
    tol = atol if atol is not None else (1e-4 if dt == np.float32 else 1e-2)
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tol, rtol=0, err_msg=f"native vs numpy, {cfg}")
    np.testing.assert_allclose(got.astype(np.float64), low.astype(np.float64), atol=tol, rtol=0,
                               err_msg=f"native vs reference lowering, {cfg}")
    return got


def causal_mask(batch, past, q_len, window=-1, pad_keys=0):
    kv = past + q_len
    qp, kp = np.arange(past, kv)[:, None], np.arange(kv)[None, :]
    keep = kp <= qp
    if window > 0:
        keep &= kp > qp - window
    mask = np.broadcast_to(keep, (batch, 1, q_len, kv)).copy()
    if pad_keys and batch > 1:  # left padding of row 1; padded queries keep themselves
        mask[1, :, :, :pad_keys] = False
        mask[1, :, np.arange(q_len), past + np.arange(q_len)] = True
    return mask


# ------------------------------------------------------------------ prefill


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(), kv=st.sampled_from([(4, 2), (4, 4), (4, 1)]), cats=category_lists(4),
       sink_tokens=st.integers(1, 3), mask_type=st.sampled_from(["none", "bool", "float"]), seed=st.integers(0, 2**16))
def test_random_profiles_and_templates(template, kv, cats, sink_tokens, mask_type, seed):
    spans, seq = template
    cfg = AttentionConfig(kv[0], kv[1], 8, 0.3, tuple(cats), sink_tokens=sink_tokens, mask_type=mask_type)
    check(cfg, spans, seq, 1, seed, mask=causal_mask(1, 0, seq))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4), cats=category_lists(6), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["BNSH", "BSD"]), window=st.sampled_from([-1, 3, 6]),
       mask_type=st.sampled_from(["bool", "float"]))
def test_batch_padding_window_and_layouts(template, cats, seed, fmt, window, mask_type):
    spans, seq = template
    cfg = AttentionConfig(6, 2, 8, 0.25, tuple(cats), mask_type=mask_type, qkv_format=fmt, local_window_size=window)
    check(cfg, spans, seq, 2, seed, mask=causal_mask(2, 0, seq, window, pad_keys=min(2, seq - 1)))


@pytest.mark.parametrize("category", ["dense", "sink", "intra", "intra_sink"])
@pytest.mark.parametrize("spans,seq", EDGE_TEMPLATES, ids=EDGE_IDS)
@pytest.mark.parametrize("fmt", ["BNSH", "BSD"])
def test_edge_templates(category, spans, seq, fmt):
    cfg = AttentionConfig(4, 2, 8, 0.35, (category,) * 4, mask_type="none", qkv_format=fmt)
    check(cfg, spans, seq, 1, 3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4), cats=category_lists(4), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["BNSH", "BSD"]), window=st.sampled_from([2, 5]))
def test_window_without_mask(template, cats, seed, fmt, window):
    spans, seq = template
    cfg = AttentionConfig(4, 2, 8, 0.3, tuple(cats), mask_type="none", qkv_format=fmt, local_window_size=window)
    check(cfg, spans, seq, 1, seed)


def test_window_hiding_every_key_of_a_sink_row_outputs_zeros():
    """A sink head's image query whose window holds no text and no sink: zeros (docs/specification.md §2)."""
    cfg = AttentionConfig(2, 1, 8, 0.3, ("sink", "dense"), mask_type="none", local_window_size=2)
    got = check(cfg, [(0, 10)], 10, 1, 0)
    assert np.all(got[0, 0, 3:] == 0) and np.any(got[0, 1, 3:] != 0)


@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
def test_gqa_ratios_across_tiles_and_key_blocks(ratio):
    """Long enough for several 32-row tiles and 64-key blocks per head, head size 64."""
    H = 2 * ratio
    cats = tuple(["dense", "sink", "intra", "intra_sink"][h % 4] for h in range(H))
    cfg = AttentionConfig(H, 2, 64, 0.125, cats, sink_tokens=2, mask_type="none")
    spans = [(5, 90), (97, 230), (240, 241), (250, 330)]
    check(cfg, spans, 345, 1, ratio, d=64)


@pytest.mark.parametrize("mask_type,fmt,past", [("none", "BSD", 0), ("float", "BNSH", 37), ("bool", "BSD", 5)])
def test_bundles_of_tiles_share_key_blocks(mask_type, fmt, past):
    """Enough query rows (two batch rows, 700 queries, 4 heads per KV head: 350 tiles)
    that the kernel runs tiles in bundles, each key block read once for a bundle;
    tiles of one bundle start and end at different keys (causal rows, images that
    begin mid-block, a cache), and a bundle's last tile may hold few rows."""
    cats = ("dense", "intra", "sink", "intra_sink", "dense", "dense", "intra", "sink")
    cfg = AttentionConfig(8, 2, 16, 0.25, cats, sink_tokens=3, mask_type=mask_type, qkv_format=fmt,
                          is_causal=1 if mask_type == "none" else 0)
    q_len = 700
    spans = [(past + 9, past + 200), (past + 213, past + 470), (past + 470, past + 471), (past + 500, past + 690)]
    mask = causal_mask(2, past, q_len, pad_keys=4) if mask_type != "none" else None
    check(cfg, spans, q_len, 2, 5, past=past, d=16, mask=mask)


@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_mask_broadcast_over_batch(mask_type):
    """A [1, 1, Sq, Skv] mask serves every batch row."""
    cfg = AttentionConfig(4, 2, 8, 0.3, ("intra", "sink", "dense", "intra_sink"), mask_type=mask_type, is_causal=0)
    check(cfg, [(2, 9), (11, 20)], 24, 3, 1, mask=causal_mask(1, 0, 24, window=7))


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("mask_type,is_causal,window,fmt", [
    ("float", 0, -1, "BNSH"), ("bool", 0, -1, "BNSH"), ("none", 1, -1, "BNSH"), ("float", 0, 5, "BNSH"),
    ("none", 1, 4, "BSD"), ("bool", 1, -1, "BSD"),
])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kv_cache_queries(mask_type, is_causal, window, fmt, data):
    """Decode steps and chunks (Sq < Skv): queries at absolute positions past..past+Sq-1."""
    spans, seq = data.draw(templates(max_images=4, max_len=6))
    seq = max(seq, 2)
    q_len = data.draw(st.integers(1, min(seq - 1, 3)))
    past = seq - q_len
    cfg = AttentionConfig(4, data.draw(st.sampled_from([1, 2, 4])), 8, 0.3, tuple(data.draw(category_lists(4))),
                          sink_tokens=data.draw(st.integers(1, 2)), is_causal=is_causal, local_window_size=window,
                          qkv_format=fmt, mask_type=mask_type)
    batch = data.draw(st.integers(1, 2))
    check(cfg, spans, q_len, batch, data.draw(st.integers(0, 99)), past=past,
          mask=causal_mask(batch, past, q_len, max(window, 0)))


def test_decode_step_after_a_long_prompt():
    """One new token over a 300-token cache, 7 query heads per KV head."""
    cfg = AttentionConfig(14, 2, 32, 32 ** -0.5, ("sink", "intra", "intra_sink", "dense", "sink", "intra", "dense") * 2)
    check(cfg, [(3, 100), (110, 250)], 1, 1, 4, past=299, d=32)


@pytest.mark.parametrize("mask_type,window,q_len,dtype", [
    ("none", -1, 1, "float32"), ("bool", -1, 2, "float32"), ("float", 6, 3, "float32"), ("float", -1, 1, "float16"),
    ("bool", 9, 1, "float16"),
])
def test_few_row_tiles(mask_type, window, q_len, dtype):
    """Tiles of at most 8 rows (a decode step's heads of one KV head) take the kernel's
    head-dim-vectorised path: head size 32, two query heads per KV head, long enough for several key blocks."""
    cfg = AttentionConfig(4, 2, 32, 0.2, ("sink", "intra", "intra_sink", "dense"), sink_tokens=2, mask_type=mask_type,
                          is_causal=1 if mask_type == "none" else 0, local_window_size=window, dtype=dtype)
    past = 200 - q_len
    check(cfg, [(3, 80), (90, 91), (100, 198)], q_len, 2, 11, past=past, d=32,
          mask=causal_mask(2, past, q_len, window, pad_keys=5), atol=1e-2 if dtype == "float16" else None)


# ------------------------------------------------------------------ Gemma 3 image blocks


def blocks_mask(spans, seq, window=-1):
    pos = np.arange(seq)
    block = np.full(seq, -1)
    for i, (s, e) in enumerate(spans):
        block[(pos > s) & (pos < e - 1)] = i
    keep = (pos[None, :] <= pos[:, None]) | ((block[:, None] >= 0) & (block[:, None] == block[None, :]))
    if window > 0:
        keep &= pos[None, :] > pos[:, None] - window
    return keep[None, None]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4), cats=category_lists(4), style=st.sampled_from(["attr", "bool", "float"]),
       window=st.sampled_from([-1, 4]), fmt=st.sampled_from(["BNSH", "BSD"]), seed=st.integers(0, 2**16))
def test_image_blocks(template, cats, style, window, fmt, seed):
    """``image_blocks`` = 1 from the attributes (is_causal=1) or with the export's mask carrying it (is_causal=0)."""
    spans, seq = template
    mask = blocks_mask(spans.tolist(), seq, window)
    if style == "attr":
        cfg = AttentionConfig(4, 2, 8, 0.3, tuple(cats), mask_type="none", image_blocks=1, local_window_size=window,
                              qkv_format=fmt)
        check(cfg, spans, seq, 1, seed)
    else:
        cfg = AttentionConfig(4, 2, 8, 0.3, tuple(cats), mask_type=style, is_causal=0, image_blocks=1, qkv_format=fmt)
        check(cfg, spans, seq, 1, seed, mask=mask)


def test_image_blocks_change_the_answer():
    cats = ("dense", "intra", "intra_sink", "sink")
    spans = [(1, 8), (10, 16)]
    blk = check(AttentionConfig(4, 2, 8, 0.3, cats, mask_type="none", image_blocks=1), spans, 18, 1, 2)
    causal = check(AttentionConfig(4, 2, 8, 0.3, cats, mask_type="none"), spans, 18, 1, 2)
    assert np.abs(blk - causal).max() > 1e-3


# ------------------------------------------------------------------ fp16


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4), cats=category_lists(4), mask_type=st.sampled_from(["none", "bool", "float"]),
       fmt=st.sampled_from(["BNSH", "BSD"]), seed=st.integers(0, 2**16))
def test_fp16(template, cats, mask_type, fmt, seed):
    """fp16 in and out, computed in fp32: within 1e-2 absolute of the float64 reference
    (about ten fp16 roundings of values below 1, bs-check's fp16 tolerance)."""
    spans, seq = template
    cfg = AttentionConfig(4, 2, 8, 0.3, tuple(cats), mask_type=mask_type, qkv_format=fmt, dtype="float16")
    check(cfg, spans, seq, 1, seed, mask=causal_mask(1, 0, seq), atol=1e-2)


def test_fp16_decode_and_window():
    cfg = AttentionConfig(4, 1, 16, 0.25, ("sink", "intra", "intra_sink", "dense"), mask_type="float", is_causal=0,
                          dtype="float16")
    check(cfg, [(2, 30), (33, 60)], 3, 2, 7, past=62, mask=causal_mask(2, 62, 3, window=20), d=16, atol=1e-2)


# ------------------------------------------------------------------ instruction sets

ISA_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from blindsight import native
from blindsight.attention import reference_attention
from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.runtime.session import make_session
assert native.isa() == sys.argv[2], native.isa()
cats = ("dense", "sink", "intra", "intra_sink", "sink", "intra")
cfg = AttentionConfig(6, 2, 24, 0.2, cats, sink_tokens=2, mask_type="bool", qkv_format="BSD")
rng = np.random.default_rng(0)
B, S, D = 2, 150, 24
q = rng.standard_normal((B, 6, S, D), dtype=np.float32); k = rng.standard_normal((B, 2, S, D), dtype=np.float32)
v = rng.standard_normal((B, 2, S, D), dtype=np.float32)
spans = np.array([[4, 60], [70, 71], [80, 140]], dtype=np.int64)
mask = np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, 1, S, S)).copy(); mask[1, :, :, :3] = False
mask[1, :, np.arange(S), np.arange(S)] = True
sess = make_session(single_node_model(cfg, "reference"), threads=2, native=True)
bsd = lambda x: x.transpose(0, 2, 1, 3).reshape(B, S, -1)
got = sess.run(None, dict(query=bsd(q), key=bsd(k), value=bsd(v), attn_mask=mask, image_spans=spans))[0]
want = reference_attention(q, k, v, spans, cats, sink_tokens=2, scale=0.2, model_mask=mask)
err = np.abs(got.reshape(B, S, 6, D).transpose(0, 2, 1, 3) - want).max()
assert err < 1e-4, err
# a decode step: 6 query heads per KV head over 203 cached keys, head size 32 (a multiple of
# every vector width), so each object's few-row path runs full key groups and a ragged tail
cfg = AttentionConfig(12, 2, 32, 32 ** -0.5, cats * 2, sink_tokens=1)
q = rng.standard_normal((1, 12, 1, 32), dtype=np.float32)
k, v = (rng.standard_normal((1, 2, 203, 32), dtype=np.float32) for _ in range(2))
spans = np.array([[2, 90], [95, 180]], dtype=np.int64)
sess = make_session(single_node_model(cfg, "reference"), threads=2, native=True)
got = sess.run(None, dict(query=q, key=k, value=v, image_spans=spans))[0]
want = reference_attention(q, k, v, spans, cfg.categories, sink_tokens=1, scale=cfg.scale)
err = max(err, np.abs(got - want).max())
assert err < 1e-4, err
print("ok", sys.argv[2], err)
"""


def _isas():
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["baseline"]
    flags = open("/proc/cpuinfo").read()
    return ["baseline"] + (["avx2"] if " avx2" in flags else []) + (["avx512"] if " avx512bw" in flags else [])


@pytest.mark.parametrize("isa", _isas())
def test_every_instruction_set_object(isa, tmp_path):
    """Each compute object of the library (picked at load time) on this machine's CPU."""
    root = os.path.dirname(os.path.dirname(native.__file__))
    env = {**os.environ, "BLINDSIGHT_NATIVE_ISA": isa}
    r = subprocess.run([sys.executable, "-c", ISA_SCRIPT, os.path.dirname(root), isa], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


# ------------------------------------------------------------------ routing and bad input


def test_make_session_routes():
    cfg = AttentionConfig(2, 1, 8, 0.3, ("intra", "dense"))
    model = single_node_model(cfg, "fast")
    assert make_session(model, threads=1).blindsight_native  # built: the default takes the kernel
    off = make_session(model, threads=1, native=False)
    assert not off.blindsight_native and "off" in off.blindsight_attention
    bf16 = AttentionConfig(2, 1, 8, 0.3, ("intra", "dense"), dtype="bfloat16")
    why = native.unsupported(bf16)
    assert why and "bfloat16" in why
    with pytest.raises(BlindSightError, match="native kernel cannot run"):
        make_session(single_node_model(bf16, "reference"), threads=1, native=True)


def test_bad_spans_are_refused_by_the_kernel():
    cfg = AttentionConfig(2, 1, 8, 0.3, ("intra", "dense"))
    nat, _ = sessions(cfg)
    x = np.zeros((1, 2, 6, 8), np.float32)
    feeds = dict(query=x, key=x[:, :1], value=x[:, :1])
    for spans, words in ((np.array([[3, 2]]), "image span 0 .3, 2. is invalid"),
                         (np.array([[0, 3], [2, 5]]), "image span 1 .2, 5. is invalid"),
                         (np.zeros((2, 3), np.int64), "image_spans")):
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=words):
            nat.run(None, {**feeds, "image_spans": spans.astype(np.int64)})


def test_native_info_command():
    r = subprocess.run([sys.executable, "-m", "blindsight.native", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "native kernel:" in r.stdout and "API 21" in r.stdout


# ------------------------------------------------------------------ end to end on tiny families

E2E_SPARSE = [["intra", "sink", "intra_sink", "dense"], ["sink", "intra", "intra", "sink"]]


@pytest.fixture(scope="module", params=["qwen2_vl", "gemma3"])
def tiny_export(request, tmp_path_factory):
    """A tiny random checkpoint of the family, exported and compiled with a sparse profile (fast lowering)."""
    import json

    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm
    from blindsight.profile import Profile

    root = tmp_path_factory.mktemp(f"native_{request.param}")
    out = export_vlm(make_tiny_checkpoint(request.param, root / "checkpoint"), root / "export").out_dir
    kv = json.loads((out / "template.json").read_text())["num_kv_heads"]
    compile_model(out / "language_model.onnx", Profile(E2E_SPARSE, num_kv_heads=kv), out / "language_model.blindsight.onnx")
    return out


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((60, 48 + 8 * i), Image.NEAREST)
            for i in range(n)]


def test_tiny_family_native_equals_function_bodies(tiny_export):
    """The compiled model with the native kernel == without it: prefill logits and KV cache
    (with Gemma 3's image blocks from token_type_ids), a decode step from that cache, and the greedy tokens."""
    from blindsight.runtime.pipeline import Pipeline
    from blindsight.runtime.positions import decode_position_ids

    nat = Pipeline(tiny_export, threads=2, native=True)
    body = Pipeline(tiny_export, threads=2, native=False)
    assert nat.attention.startswith("native kernel") and body.attention.startswith("function bodies")
    built = body.prompts.build(_images(2), "compare <image> with <image>, which is brighter?")
    spans = body.image_spans(built.input_ids)
    assert len(spans) == 2
    embeds = body.embeddings(built)
    pos, delta = body.position_ids(built)
    s = built.input_ids.size
    want_logits, want_cache = body._run_lm(embeds, pos, body._empty_past(), s, spans)
    got_logits, got_cache = nat._run_lm(embeds, pos, nat._empty_past(), s, spans)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in want_cache:
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-4, atol=1e-4)
    token = np.array([[int(np.argmax(want_logits))]], dtype=np.int64)
    step = body.embed.run(None, {"input_ids": token})[0]
    step_pos = decode_position_ids(s + delta, pos.shape[0] if pos.ndim == 3 else 1)
    want_step, _ = body._run_lm(step, step_pos, want_cache, s + 1, spans)
    got_step, _ = nat._run_lm(step, step_pos, want_cache, s + 1, spans)
    np.testing.assert_allclose(got_step, want_step, rtol=1e-4, atol=1e-4)
    assert nat.generate_from(built, 6).token_ids == body.generate_from(built, 6).token_ids


def test_bs_run_and_bs_check_say_which_path_ran(tiny_export):
    img = tiny_export / "native_test.png"
    _images(1)[0].save(img)
    args = [sys.executable, "-c", "from blindsight.entry import bs_run; import sys; sys.exit(bs_run(sys.argv[1:]))",
            str(tiny_export), "--image", str(img), "--prompt", "describe", "--max-new-tokens", "2", "--threads", "2"]
    on = subprocess.run(args, capture_output=True, text=True)
    off = subprocess.run(args + ["--no-native"], capture_output=True, text=True)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "BlindSight attention: native kernel" in on.stdout
    assert "BlindSight attention: function bodies (native kernel off)" in off.stdout
    assert on.stdout.split("\n[")[0] == off.stdout.split("\n[")[0]  # the same answer
    from blindsight.runtime.parity import check as parity_check

    dense_compile = tiny_export / "language_model.blindsight.onnx"
    report = parity_check(dense_compile, dense_compile, seq_len=24, images=2, threads=2)
    assert report.passed and report.attention.startswith("native kernel")
    assert "COMPILED's attention: native kernel" in report.table()


# ------------------------------------------------------------------ the build step


def test_apt_mirrors_from_both_source_formats(tmp_path):
    from blindsight.native.build import apt_mirrors

    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# deb http://old.example/debian bookworm main\n"
                                           "deb [arch=amd64] http://one.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "d.sources").write_text(
        "Types: deb\nURIs: http://two.example/debian/\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://two.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirrors(str(tmp_path)) == ["http://one.example/debian", "http://two.example/debian"]


def test_a_package_with_another_sha256_is_refused(tmp_path):
    from blindsight.native.build import DEB_FILE, verify

    fake = tmp_path / DEB_FILE
    fake.write_bytes(b"!<arch>\nnot the package")
    with pytest.raises(BlindSightError, match="is not the pinned 14f7d959"):
        verify(fake)


def test_build_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blindsight.native", "build", "--headers", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no onnxruntime_c_api.h" in r.stderr
    assert "Traceback" not in r.stderr
    assert native.available()  # the built library is left alone


def test_unpack_without_dpkg(tmp_path, monkeypatch):
    """The Python ar/tar route (a machine without dpkg-deb) on a package of the .deb layout."""
    import io
    import tarfile

    from blindsight.native import build as nb

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        body = b"#define ORT_API_VERSION 21\n"
        info = tarfile.TarInfo("./usr/include/onnxruntime/onnxruntime_c_api.h")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]
    ar = b"!<arch>\n"
    for name, blob in members:
        ar += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob + (b"\n" if len(blob) % 2 else b"")
    deb = tmp_path / "x.deb"
    deb.write_bytes(ar)
    monkeypatch.setattr(nb.shutil, "which", lambda name: None)
    nb.unpack(deb, tmp_path / "out")
    assert nb.api_version(tmp_path / "out" / "usr" / "include" / "onnxruntime") == 21


# ------------------------------------------------------------------ key clauses: the kernel reads the rule table

KEY_CLAUSE_TOYS = {
    "sinks_only": ("SINK",),  # image queries see the sinks of every image, no text
    "own_image_only": ("SAME_IMAGE",),
    "own_image_and_sinks": ("SAME_IMAGE", "SINK"),
    "text_only": ("TEXT",),
}


@pytest.fixture
def toy_rules(monkeypatch):
    """Categories defined only in the rule table, for this test: new combinations of its clauses."""
    from blindsight.attention import semantics

    for name, parts in KEY_CLAUSE_TOYS.items():
        monkeypatch.setitem(semantics.RULES, name, tuple(getattr(semantics, p) for p in parts))
    return tuple(KEY_CLAUSE_TOYS)


def test_the_library_reads_the_clause_bits_of_the_table():
    from blindsight.attention.semantics import CLAUSE_BITS

    assert native.kernel_clauses() == {c.name: bit for c, bit in CLAUSE_BITS.items()}
    assert native.readable_bits() == sum(CLAUSE_BITS.values())


@pytest.mark.parametrize("spans,seq", EDGE_TEMPLATES + [([(1, 5), (5, 6), (8, 14)], 17)], ids=EDGE_IDS + ["three"])
@pytest.mark.parametrize("fmt", ["BNSH", "BSD"])
def test_a_category_only_the_rule_table_knows_runs_on_the_kernel(toy_rules, spans, seq, fmt):
    """Toy categories (added to RULES here, nowhere else) give the kernel bit sets it
    never saw in the built-in categories; it equals the numpy reference and the function body."""
    cats = toy_rules + ("intra", "dense")
    cfg = AttentionConfig(6, 2, 8, 0.3, cats, sink_tokens=2, mask_type="bool", qkv_format=fmt)
    assert native.unsupported(cfg) is None
    check(cfg, spans, seq, 2, 5, mask=causal_mask(2, 0, seq, pad_keys=min(2, seq - 1)))


def test_toy_categories_on_the_kernel_with_a_cache_and_long_rows(toy_rules):
    cfg = AttentionConfig(8, 2, 32, 0.2, toy_rules * 2, sink_tokens=3, mask_type="none")
    check(cfg, [(3, 80), (90, 91), (100, 198)], 1, 1, 2, past=199, d=32)
    check(cfg, [(3, 80), (90, 91), (100, 198)], 200, 1, 3, d=32)


def test_a_clause_the_kernel_does_not_read_stays_on_the_function_bodies(monkeypatch):
    from blindsight.attention import semantics

    odd = semantics.Clause("query_is_sink", lambda q, k, ops: q.sink, key_only=False)
    monkeypatch.setitem(semantics.RULES, "odd", (semantics.TEXT, odd))
    cfg = AttentionConfig(2, 1, 8, 0.3, ("odd", "dense"))
    assert cfg.key_clauses == (semantics.OTHER_CLAUSE | 2, 1)
    assert "does not read every key clause of odd" in native.unsupported(cfg)
    model = single_node_model(cfg, "reference")
    assert not make_session(model, threads=1).blindsight_native
    with pytest.raises(BlindSightError, match="native kernel cannot run this model.*odd"):
        make_session(model, threads=1, native=True)


def _without_key_clauses(model):
    for node in model.graph.node:
        keep = [a for a in node.attribute if a.name != "key_clauses"]
        del node.attribute[:]
        node.attribute.extend(keep)
    return model


def _with_key_clauses(model, bits):
    from onnx import helper

    _without_key_clauses(model)
    for node in model.graph.node:
        node.attribute.append(helper.make_attribute("key_clauses", list(bits)))
    return model


def _raw_session(model):
    """The library registered by hand, no blindsight check before ONNX Runtime loads the model."""
    opts = ort.SessionOptions()
    native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_a_node_without_key_clauses_runs_on_its_function_body_only():
    """An older bs-compile's node: the kernel refuses it; the default falls back, with the reason."""
    cfg = AttentionConfig(4, 2, 8, 0.3, ("sink", "intra", "intra_sink", "dense"))
    model = _without_key_clauses(single_node_model(cfg, "reference"))
    with pytest.raises(BlindSightError, match="compiled before the kernel read key clauses: recompile with bs-compile"):
        make_session(model, threads=1, native=True)
    sess = make_session(model, threads=1)
    assert not sess.blindsight_native and native.STALE in sess.blindsight_attention
    spans = np.array([[1, 5], [6, 9]], np.int64)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, h, 10, 8)).astype(np.float32) for h in (4, 2, 2))
    got = sess.run(None, dict(query=q, key=k, value=v, image_spans=spans))[0]
    want = reference_attention(q, k, v, spans, cfg.categories, scale=0.3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(Exception, match="no 'key_clauses' attribute: it was compiled by an older bs-compile; "
                                        r"recompile it, or run it on its function bodies \(native=False\)"):
        _raw_session(model)


def test_key_clauses_that_disagree_with_the_categories_are_an_error():
    from blindsight.attention.schema import KeyClausesError, proto_configs

    cfg = AttentionConfig(4, 2, 8, 0.3, ("sink", "intra", "intra_sink", "dense"))
    model = _with_key_clauses(single_node_model(cfg, "reference"), [6, 14, 14, 1])
    words = r"key_clauses \[6, 14, 14, 1\] disagree with categories .*head 1 says 14 \(text, sink, same_image\), " \
            r"its category gives 10 \(text, same_image\).*recompile"
    for native_arg in (None, True):
        with pytest.raises(KeyClausesError, match=words):
            make_session(model, threads=1, native=native_arg)
    with pytest.raises(KeyClausesError, match=words):
        proto_configs(model.graph)
    import onnx_ir as ir

    with pytest.raises(KeyClausesError, match=words):
        AttentionConfig.from_node(next(iter(ir.serde.deserialize_model(model).graph)))
    short = _with_key_clauses(single_node_model(cfg, "reference"), [6, 10, 14])
    with pytest.raises(KeyClausesError, match="head 3 says nothing"):
        proto_configs(short.graph)
    # the kernel itself refuses bits it does not read
    odd = _with_key_clauses(single_node_model(cfg, "reference"), [6, 10, 14, 1 | 64])
    with pytest.raises(Exception, match="head 3 of layer 0 has key_clauses 65, with bits this kernel does not read"):
        _raw_session(odd)


def test_key_clauses_are_derived_never_given():
    import onnx_ir as ir

    from blindsight.attention.schema import write_attributes

    cfg = AttentionConfig(2, 1, 8, 0.3, ("intra", "dense"))
    assert cfg.key_clauses == (10, 1) and cfg.attributes()["key_clauses"] == [10, 1]
    with pytest.raises(TypeError):
        AttentionConfig(2, 1, 8, 0.3, ("intra", "dense"), key_clauses=(1, 1))
    node = next(iter(ir.serde.deserialize_model(single_node_model(cfg, "reference")).graph))
    with pytest.raises(ValueError, match="key_clauses cannot be written: derived from categories"):
        write_attributes(node, key_clauses=[1, 1])
    write_attributes(node, categories=["sink", "intra_sink"])
    assert list(node.attributes["key_clauses"].value) == [6, 14]
    assert AttentionConfig.from_node(node).categories == ("sink", "intra_sink")


def _node_io_model(path):
    """A compiled model with every BlindSightAttention node's Q/K/V/mask and output as graph outputs,
    and per node (categories, sink_tokens, scale, input names, output name)."""
    import onnx_ir as ir

    from blindsight.attention.schema import is_blindsight

    model = ir.load(path)
    nodes = []
    for node in model.graph:
        if is_blindsight(node):
            values = [v for v in node.inputs[:4] if v is not None] + [node.outputs[0]]
            for v in values:
                if v not in model.graph.outputs and not v.is_graph_input():
                    model.graph.outputs.append(v)
            cfg = AttentionConfig.from_node(node, require_key_clauses=True)
            nodes.append((cfg, [v.name for v in node.inputs[:4] if v is not None], node.outputs[0].name))
    return ir.serde.serialize_model(model).SerializeToString(), nodes


def test_two_profiles_of_one_source_share_one_session_options(exported, tmp_path):
    """ONNX Runtime's usual idiom: one SessionOptions with the library registered, two
    sessions from it, over two compilations of one source with different profiles (their
    layer 0 nodes carry different categories). Each equals its own function bodies, and each
    node's output the numpy reference on that node's inputs."""
    import onnx

    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.configs import tiny_config
    from blindsight.models.export import example_inputs, text_dims
    from blindsight.profile import Profile

    family = "qwen2_vl"
    src = exported(family, "attention_op")
    dims = text_dims(family, tiny_config(family))
    L, H, kv = dims["num_layers"], dims["num_heads"], dims["num_kv_heads"]
    order = ("dense", "sink", "intra", "intra_sink")
    models = []
    for shift, sinks in ((0, 1), (1, 2)):
        profile = Profile([[order[(h + layer + shift) % 4] for h in range(H)] for layer in range(L)],
                          num_kv_heads=kv, sink_tokens=sinks)
        out = tmp_path / f"profile{shift}.onnx"
        compile_model(src, profile, out, "fast")
        models.append(_node_io_model(out))
    assert models[0][1][0][0].categories != models[1][1][0][0].categories

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    native.register(opts)
    shared = [ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for m, _ in models]

    spans = [(2, 9), (9, 12), (15, 27)]
    feeds = example_inputs(family, tiny_config(family), 1, 30, 3)
    feeds["image_spans"] = np.asarray(spans, dtype=np.int64)
    def outputs(sess):
        names = {i.name for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feeds.items() if k in names})))

    logits = []
    for sess, (model, nodes) in zip(shared, models):
        assert native.plan(onnx.load_from_string(model)).native
        got, want = outputs(sess), outputs(make_session(model, threads=2, native=False))
        names = list(got)
        for name in names:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
        for cfg, inputs, output in nodes:
            q, k, v = (got[n] for n in inputs[:3])
            mask = None
            if len(inputs) > 3:
                m = got[inputs[3]]
                mask = m if m.dtype == bool else m > np.finfo(m.dtype).min / 2
            ref = reference_attention(q, k, v, spans, cfg.categories, sink_tokens=cfg.sink_tokens, scale=cfg.scale,
                                      model_mask=mask, causal=bool(cfg.is_causal))
            np.testing.assert_allclose(got[output], ref, atol=1e-4, err_msg=f"layer {cfg.layer}")
        logits.append(got["logits"])
    assert np.abs(logits[0] - logits[1]).max() > 1e-3  # the two profiles do differ


# ------------------------------------------------------------------ the build comparison benchmark


def test_native_ab_checks_and_times_each_build(tmp_path):
    """benchmarks.native_ab: every build is checked against numpy before timing; rows per build and cache length."""
    import json

    lib = str(native.library_path())
    root = os.path.dirname(os.path.dirname(native.__file__))
    r = subprocess.run([sys.executable, "-m", "benchmarks.native_ab", lib, lib, "--contexts", "37,150", "--heads", "6",
                        "--head-dim", "32", "--layers", "2", "--repeats", "1", "--json"], capture_output=True, text=True,
                       cwd=os.path.dirname(root))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [(x["keys"], x["library"]) for x in rows] == [(37, lib), (37, lib), (150, lib), (150, lib)]
    assert all(x["cold_ms"] > 0 and x["warm_ms"] > 0 for x in rows)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.native_ab", str(tmp_path / "none.so")], capture_output=True,
                         text=True, cwd=os.path.dirname(root))
    assert bad.returncode == 2 and "is not a file" in bad.stderr and "Traceback" not in bad.stderr
