"""bs-demo on its embedded default (real-weights part off to stay fast): parity rows and the FLOP bound."""

import json
import subprocess
import sys

import numpy as np
import pytest

from blindsight.flops import Template
from blindsight.profile import load, mixed_layer
from blindsight.attention import allowed_mask


def _bs_demo(*args):
    return subprocess.run([sys.executable, "-m", "blindsight.demo", *map(str, args)], capture_output=True, text=True)


def test_bs_demo_runs_the_flow_and_reports_parity(tmp_path):
    out = tmp_path / "demo"
    r = _bs_demo("--out", out, "--no-real-weights", "--images", 3, "--image-len", 24, "--repeats", 1,
                 "--new-tokens", 4, "--speed-layers", 2, "--json")
    assert r.returncode == 0, r.stderr
    assert "[1/" in r.stderr  # progress is shown
    rec = json.loads(r.stdout)
    assert rec["ok"] and rec["vlm"]["parity_dense"] and rec["vlm"]["parity_sparse"]
    answers = rec["vlm"]["answers"]
    assert answers["fast"]["token_ids"] == answers["reference"]["token_ids"]
    assert len(answers["fast"]["image_spans"]) == 3
    assert rec["real_weights"] == {"skipped": "--no-real-weights"}
    # the tiny VLM's time to first token: the compiled mix on the kernel (when built) and on its function bodies
    from blindsight import native

    ttft = rec["vlm_ttft"]
    assert ttft["attention"].startswith("native kernel" if native.available() else "function bodies")
    assert ttft["ratio"] == pytest.approx(ttft["export"] / ttft["fast"]) and ttft["fast_bodies"] > 0
    assert load(out / "export" / "profile.json").num_layers == 2
    # the timing runs on Qwen2-VL-2B's attention dimensions (12 query / 2 KV heads of 128), not the tiny VLM's
    speed = rec["speed_qwen2_vl_2b_dims"]
    assert speed["seq_len"] == Template(num_images=3, image_len=24).seq_len and speed["speedup_vs_dense"] > 0
    # its attention FLOP bound, recomputed from the docs/specification.md §2 masks of the timed profile (layer 0 dense, then the mixed layer)
    layers = [["dense"] * 12, list(mixed_layer(12))]
    tpl = Template(num_images=3, image_len=24)
    pairs = {c: allowed_mask(c, tpl.spans, tpl.seq_len).sum() for c in ("dense", "sink", "intra", "intra_sink")}
    dense = sum(pairs["dense"] for layer in layers for _ in layer)
    sparse = sum(pairs[c] for layer in layers for c in layer)
    assert np.isclose(speed["flops"]["attention_bound"], dense / sparse)
    # and one layer's attention alone (the mixed layer vs GroupQueryAttention), its bound from the same masks
    op = rec["attention_qwen2_vl_2b_dims"]
    assert op["speedup"] > 0 and np.isclose(op["flop_bound"], pairs["dense"] * 12 / sum(pairs[c] for c in layers[1]))
    for name in ("template.json", "vision.onnx", "embed.onnx", "language_model.onnx", "language_model.blindsight.onnx"):
        assert (out / "export" / name).is_file()


def test_bs_demo_bad_option_is_one_line(tmp_path):
    r = _bs_demo("--out", tmp_path / "d", "--images", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.strip()] == ["bs-demo: error: --images must be at least 1"]
    assert not (tmp_path / "d").exists()
