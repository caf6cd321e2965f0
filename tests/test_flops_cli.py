"""bs-flops from the command line: the JSON record against brute force, the table, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

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
