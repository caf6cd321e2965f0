"""bs-demo (real-weights part off and the timing model shrunk to stay fast): parity rows, routes, the FLOP bound, the table."""

import json
import subprocess
import sys

import numpy as np
import pytest

from blindsight.flops import Template
from blindsight.profile import load, mixed_layer
from blindsight.attention import allowed_mask


#: a Qwen2-VL text model of a few KB standing in for the 2B timing model (its structure, random weights)
SMALL_SPEED = {"text_config": {"vocab_size": 700, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "intermediate_size": 96, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
               "vision_config": {"depth": 1, "hidden_size": 128, "embed_dim": 32, "num_heads": 2}}


def _bs_demo(*args):
    return subprocess.run([sys.executable, "-m", "blindsight.demo", *map(str, args)], capture_output=True, text=True)


def test_bs_demo_runs_the_flow_and_reports_parity(tmp_path, capsys):
    from blindsight import native
    from blindsight.demo import WIDTH, Table, main

    out = tmp_path / "demo"
    rc = main(["--out", str(out), "--no-real-weights", "--images", "3", "--image-len", "24", "--new-tokens", "4",
               "--speed-layers", "2", "--chunk-size", "40", "--json"], speed_overrides=SMALL_SPEED)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "[1/" in captured.err  # progress is shown
    rec = json.loads(captured.out)
    assert rec["ok"] and rec["vlm"]["parity_dense"] and rec["vlm"]["parity_sparse"]
    answers = rec["vlm"]["answers"]
    assert answers["fast"]["token_ids"] == answers["reference"]["token_ids"]
    assert len(answers["fast"]["image_spans"]) == 3
    assert rec["real_weights"] == {"skipped": "--no-real-weights"}
    # every compiled model ran on the kernel when it is built, and the rows say which route ran
    assert rec["native"]["used"] == native.available()
    route = "native kernel" if native.available() else "function bodies"
    assert rec["vlm"]["attention"].startswith(route) and rec["speed_qwen2_vl_2b"]["attention"].startswith(route)
    assert load(out / "export" / "profile.json").num_layers == 2
    speed = rec["speed_qwen2_vl_2b"]
    tpl = Template(num_images=3, image_len=24)
    assert speed["seq_len"] == tpl.seq_len and speed["chunk"] == 40 and speed["speedup_vs_dense"] > 0
    assert speed["first_tokens"]["raw"] == speed["first_tokens"]["dense"] and speed["dense_vs_raw_max_abs_logit_diff"] < 1e-4
    # its attention FLOP bound, recomputed from the docs/specification.md §2 masks of the timed
    # profile: the op-level benchmark's mixed layer in both layers
    layers = [list(mixed_layer(4))] * 2
    pairs = {c: allowed_mask(c, tpl.spans, tpl.seq_len).sum() for c in ("dense", "sink", "intra", "intra_sink")}
    dense = sum(pairs["dense"] for layer in layers for _ in layer)
    sparse = sum(pairs[c] for layer in layers for c in layer)
    assert np.isclose(speed["flops"]["attention_bound"], dense / sparse)
    assert np.isclose(speed["speedup_vs_dense"], speed["median_s"]["dense"] / speed["median_s"]["mix"])
    for name in ("template.json", "vision.onnx", "embed.onnx", "language_model.onnx", "language_model.blindsight.onnx"):
        assert (out / "export" / name).is_file()
    # the table a person reads fits 100 columns, and the last line names the headline
    table = Table(quiet=True)
    table.rows = rec["rows"]
    text = table.render()
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "mix vs all-dense compile" in text and rec["headline"].startswith("Headline: 3 images x 24 tokens")


def test_bs_demo_bad_option_is_one_line(tmp_path):
    r = _bs_demo("--out", tmp_path / "d", "--images", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.strip()] == ["bs-demo: error: --images must be at least 1"]
    assert not (tmp_path / "d").exists()


def test_a_kernel_that_cannot_be_built_is_said_in_one_row_and_the_tour_goes_on(monkeypatch):
    """No compiler (or no headers): the demo says why and runs the function bodies, labelled."""
    import argparse

    from blindsight import native
    from blindsight.demo import Table, kernel
    from blindsight.errors import BlindSightError
    from blindsight.native import build as build_module

    def no_compiler(*args, **kwargs):
        raise BlindSightError("g++ not found: install a C++ compiler or pass --cxx")

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(build_module, "build", no_compiler)
    table, record = Table(quiet=True), {}
    assert kernel(argparse.Namespace(no_native=False, quiet=True), table, record) is False
    (row,) = table.rows
    assert row["value"] == "not built" and row["note"].startswith("g++ not found")
    assert "function bodies" in row["note"] and record["native"]["used"] is False
