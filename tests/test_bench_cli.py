"""bs-bench from the command line: fields, levels, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from blindsight.attention import allowed_mask


def _run(*args, timeout=600):
    code = "import sys; from blindsight.bench.cli import main; sys.exit(main(sys.argv[1:]))"
    assert args[0] == "bs-bench"
    return subprocess.run([sys.executable, "-c", code, *args[1:]], capture_output=True, text=True, timeout=timeout)


def test_bench_bad_input():
    r = _run("bs-bench", "--cases", "intra,bogus", "--level", "op")
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr
    r = _run("bs-bench", "--sizes", "4by2", "--level", "op")
    assert r.returncode == 2 and "--sizes" in r.stderr


OP_FIELDS = {"category", "N", "L", "seq_len", "speedup", "flop_bound", "efficiency", "peak_rss_mb"}
PREFILL_FIELDS = {"speedup", "flop_bound", "efficiency", "vs_raw_export"}


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    r = _run("bs-bench", "--quick", "--json", "--work-dir", str(tmp_path / "work"), "--output", str(out), "--plot", str(plot), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert json.loads(out.read_text()) == rec
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cats = {row["category"] for row in rec["op"]}
    assert cats == {"dense", "sink", "intra", "intra_sink", "mixed"}
    for row in rec["op"]:
        assert OP_FIELDS <= row.keys()
        assert row["speedup"] > 0 and row["peak_rss_mb"] > 0
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_bound"])
        if row["category"] == "dense":
            assert row["flop_bound"] == 1.0
        else:
            assert row["flop_bound"] > 1.0
    pf = rec["prefill"]
    assert PREFILL_FIELDS <= pf.keys()
    assert pf["flop_bound"] > 1.0 and pf["efficiency"] == pytest.approx(pf["speedup"] / pf["flop_bound"])
    # the native kernel is built for the tests (README): its variant is in the record
    assert rec["native"] and "headers onnxruntime 1.21.0" in rec["native"]
    for row in rec["op"]:
        assert row["native_speedup"] > 0 and row["native_peak_rss_mb"] > 0
        assert row["native_efficiency"] == pytest.approx(row["native_speedup"] / row["flop_bound"])
        assert row["native_vs_function_body"] == pytest.approx(row["time_s"] / row["native_s"])
    assert pf["native_speedup"] > 0 and pf["native_dense_vs_dense"] > 0
    assert pf["native_efficiency"] == pytest.approx(pf["native_speedup"] / pf["flop_bound"])
    (dec,) = rec["decode"]  # quick: one context of 256 cached tokens
    assert dec["context"] == 256 and dec["raw_s"] > 0 and dec["compiled_s"] > 0
    assert dec["ratio"] == pytest.approx(dec["raw_s"] / dec["compiled_s"])
    assert dec["compiled_tokens_per_s"] == pytest.approx(1 / dec["compiled_s"])


def test_decode_context_template_and_feeds():
    """The decode context is docs/specification.md §6's template stretched to the asked length; the
    past tensors have that length and the new token sits right after it."""
    from blindsight.bench.decode import DecodeCase, context_template, feeds

    for context in (92, 256, 1024, 8193):
        t = context_template(context)
        assert t.seq_len == context and t.num_images == 4 and t.spans[-1][1] < context
    f = feeds(DecodeCase(num_layers=2), 256)
    assert f["past_key_values.1.value"].shape == (1, 2, 256, 128)  # Qwen2-VL-2B: 2 KV heads of 128
    assert f["attention_mask"].shape == (1, 257) and int(f["position_ids"][0, 0, 0]) == 256
    r = _run("bs-bench", "--level", "decode", "--contexts", "50")
    assert r.returncode == 2 and "at least 92" in r.stderr and "Traceback" not in r.stderr


def test_bench_op_level_fp16_rows():
    r = _run("bs-bench", "--level", "op", "--dtype", "fp16", "--sizes", "2x64", "--cases", "sink,mixed", "--repeats", "1",
             "--no-memory", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert rec["dtype"] == "float16" and rec["provider"] == "cpu"
    assert [row["category"] for row in rec["op"]] == ["sink", "mixed"]
    for row in rec["op"]:
        assert row["dtype"] == "float16" and row["speedup"] > 0 and row["flop_bound"] > 1.0
        assert row["native_speedup"] > 0 and row["native_s"] > 0
    r = _run("bs-bench", "--level", "op", "--sizes", "2x64", "--cases", "sink", "--repeats", "1", "--no-memory",
             "--no-native", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert rec["native"] is None and "native_speedup" not in rec["op"][0]


def test_bench_bf16_on_cpu_is_one_line():
    r = _run("bs-bench", "--level", "op", "--dtype", "bf16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fp16" in r.stderr


def _block_pairs(cat, spans, seq):
    """Allowed pairs with Gemma 3's blocks by hand: causal or the same span interior."""
    q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
    block = np.full(seq, -1)
    for i, (s, e) in enumerate(spans):
        block[s + 1:e - 1] = i
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    cat_keep = allowed_mask(cat, np.array(spans), seq, causal=False)
    return int((cat_keep & ((k <= q) | same)).sum())


def test_bench_image_blocks_rows_and_merge(tmp_path):
    """--image-blocks: the baseline is the all-dense node with blocks, the bound
    counts block pairs (brute force), causal GQA is timed beside; --merge keeps
    causal and block rows of two runs."""
    blk, causal = tmp_path / "blk.json", tmp_path / "causal.json"
    r = _run("bs-bench", "--image-blocks", "--sizes", "2x40", "--cases", "dense,intra,sink", "--repeats", "1", "--no-memory",
             "--json", "--output", str(blk))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert "prefill" not in rec  # --image-blocks is op level only
    spans, seq = [(32, 72), (80, 120)], 152  # docs/specification.md §6 template: prefix 24, then gap 8 before every image, question 32
    for row in rec["op"]:
        assert row["image_blocks"] is True and row["baseline"].startswith("all-dense BlindSightAttention")
        assert row["causal_gqa_s"] > 0 and row["seq_len"] == seq
        want = _block_pairs("dense", spans, seq) / _block_pairs(row["category"], spans, seq)
        assert row["flop_bound"] == pytest.approx(want)
    assert next(r for r in rec["op"] if r["category"] == "sink")["flop_bound"] > 1.5
    r = _run("bs-bench", "--level", "op", "--sizes", "2x40", "--cases", "intra", "--repeats", "1", "--no-memory",
             "--output", str(causal))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("bs-bench", "--merge", str(causal), str(blk))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Gemma 3 image blocks" in r.stdout and "vs GroupQueryAttention" in r.stdout
    bad = _run("bs-bench", "--image-blocks", "--level", "prefill")
    assert bad.returncode == 2 and "--level op" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("heads", [(12, 2), (28, 4)])
def test_op_baseline_is_causal_attention(heads):
    """The op level's GroupQueryAttention baseline (empty past, present buffers)
    computes causal attention: the numpy reference with every head dense."""
    from blindsight.attention.reference import reference_attention
    from blindsight.bench.op import OpShape, causal_gqa, feeds_for
    from blindsight.flops import Template
    from blindsight.runtime.session import make_session

    shape, t = OpShape(num_heads=heads[0], kv_num_heads=heads[1]), Template(2, 48)
    feeds = feeds_for(shape, t)
    plain = {k: v for k, v in feeds.items() if k != "image_spans"}
    got = make_session(causal_gqa(shape), threads=2, native=False).run(None, plain)[0]
    q, k, v = (plain[n].reshape(1, t.seq_len, -1, shape.head_dim).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
    want = reference_attention(q, k, v, feeds["image_spans"], ["dense"] * heads[0])
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3).reshape(1, t.seq_len, -1), rtol=0, atol=1e-5)
