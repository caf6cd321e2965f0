"""bs-flops from the command line: the JSON record against brute force, the table, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from blindsight.attention import allowed_mask


def _run(*args, timeout=600):
    code = "import sys; from blindsight.flops.cli import main; sys.exit(main(sys.argv[1:]))"
    assert args[0] == "bs-flops"
    return subprocess.run([sys.executable, "-c", code, *args[1:]], capture_output=True, text=True, timeout=timeout)


def test_flops_json_equals_brute_force(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "sliding_window": 6,
           "layer_types": ["sliding_attention", "full_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = _run("bs-flops", "--model", str(tmp_path), "--images", "3", "--image-len", "5", "--prefix", "2", "--gap", "1",
             "--question", "3", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    spans = np.array([[3, 8], [9, 14], [15, 20]])
    seq = 23
    assert rec["seq_len"] == seq
    q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
    for cat in ("dense", "sink", "intra", "intra_sink"):
        pairs = 0
        for window in (6, None):
            m = allowed_mask(cat, spans, seq)
            if window:
                m &= k > q - window
            pairs += 4 * int(m.sum())  # 4 heads per layer
        got = rec["profiles"][cat]
        assert got["attention_sparse"] == 4 * 8 * pairs
        assert got["attention_dense"] == rec["profiles"]["dense"]["attention_sparse"]
    assert rec["profiles"]["sink"]["attention_reduction"] > 0


def test_flops_table_and_errors(tmp_path):
    r = _run("bs-flops", "--model", "qwen2-vl-7b", "--images", "8", "--image-len", "1024")
    assert r.returncode == 0 and "intra_sink" in r.stdout and "bound" in r.stdout
    bad = _run("bs-flops", "--model", "no-such-model")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "built-in name" in bad.stderr
    neg = _run("bs-flops", "--image-len", "0")
    assert neg.returncode == 2 and "--image-len" in neg.stderr and "Traceback" not in neg.stderr


def test_scaling_reports_the_attention_share_and_bounds_per_length(capsys):
    """bs-flops --scaling: the nearest template prompt per length, and the dense
    attention share recomputed here in closed form from the configuration's numbers
    (causal pairs S(S+1)/2 per head; projections, gated MLP and one LM-head row)."""
    from blindsight.configs import load as load_config
    from blindsight.flops import Template, count_flops, model_dims
    from blindsight.flops.cli import main
    from blindsight.profile import Profile

    assert main(["--scaling", "--models", "qwen2-vl-2b", "--lengths", "4096,16384,32768", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["num_images"], r["seq_len"]) for r in rows] == [(4, 4184), (16, 16568), (32, 33080)]
    t = load_config("qwen2-vl-2b")["text_config"]
    h, heads, kv, layers = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["num_hidden_layers"]
    d = h // heads
    for r in rows:
        S = r["seq_len"]
        attention = layers * heads * 4 * d * S * (S + 1) // 2
        linear = layers * (2 * S * h * d * (2 * heads + 2 * kv) + 2 * S * 3 * h * t["intermediate_size"]) + 2 * h * t["vocab_size"]
        assert r["attention_share"] == pytest.approx(attention / (attention + linear), rel=1e-9)
        dims = model_dims("qwen2-vl-2b")
        tpl = Template(r["num_images"], 1024)
        want = count_flops(dims, Profile.mixed(dims.num_layers, dims.num_heads, first_dense=True), tpl.spans, tpl.seq_len)
        assert (r["attention_bound"], r["prefill_bound"]) == pytest.approx((want.attention_bound, want.prefill_bound))
    shares = [r["attention_share"] for r in rows]
    bounds = [r["prefill_bound"] for r in rows]
    assert shares == sorted(shares) and bounds == sorted(bounds) and bounds[0] > 1


def test_scaling_bad_input_is_one_line(capsys):
    from blindsight.flops.cli import main

    for args, msg in ((["--lengths", "4k"], "comma-separated integers"), (["--lengths", "0"], "positive"),
                      (["--models", "qwen2-vl-72b"], "qwen2-vl-72b")):
        assert main(["--scaling", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bs-flops: error:") and msg in err, err
