"""bs-bench --level model: the whole KV-cache language model of a
full-size configuration, timed raw vs compiled all-dense vs compiled with the
profile mix. Shrunk here (the same code path as the full-size runs); timings
are not checked, what was timed is."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

# Qwen2-VL-2B's configuration, 3 layers and small widths (M-RoPE sections resized to head_dim 32); three
# layers so that the profile reaches the last position's logits: layer 0 is dense, layer 1 changes image
# tokens' outputs, layer 2's text queries read them
SMALL = {"text_config": {"num_hidden_layers": 3, "vocab_size": 700, "hidden_size": 128, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "intermediate_size": 96,
                         "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
         "vision_config": {"depth": 1, "hidden_size": 128, "embed_dim": 32, "num_heads": 2}}


def test_model_level_times_one_model_three_ways(tmp_path):
    import onnx
    import onnxruntime as ort

    from blindsight.bench.model import ModelCase, run
    from blindsight.bench.render import render_model
    from blindsight.flops import Template

    case = ModelCase("qwen2-vl-2b", 2, 24, "fp32", SMALL)
    rec = run(case, tmp_path, threads=1, repeats=1, decode_repeats=2, native=False, memory=True)
    t = Template(2, 24)
    assert (rec["seq_len"], rec["num_layers"], rec["vocab_size"]) == (t.seq_len, 3, 700)
    assert set(rec["ttft_s"]) == {"raw", "dense", "mix"} and set(rec["decode_s"]) == {"raw", "mix", "mix-plain"}
    assert rec["bound_vs_plain_decode"] == pytest.approx(rec["decode_s"]["mix-plain"] / rec["decode_s"]["mix"])
    assert rec["speedup"] == pytest.approx(rec["ttft_s"]["dense"] / rec["ttft_s"]["mix"])
    assert rec["decode_ratio"] == pytest.approx(rec["decode_s"]["raw"] / rec["decode_s"]["mix"])
    assert rec["attention"] == "function bodies (native kernel off)"
    assert set(rec["peak_rss_mb"]) == {"raw", "dense", "mix"} and rec["flop_bound"] > 1
    json.dumps(rec)
    assert "model level: qwen2-vl-2b (shrunk)" in render_model(rec)

    # the peak is the model's: the measuring process never loads torch (a deployment does not)
    from dataclasses import asdict

    from blindsight.bench.timing import measure_in_child

    child = measure_in_child("blindsight.bench.model", {"case": vars(case), "dims": asdict(case.dims()), "threads": 1,
                                                        "path": str(tmp_path / f"{case.key()}.mix.onnx"), "provider": "cpu",
                                                        "native": False, "raw": False})
    assert child["torch_loaded"] is False and child["peak_rss_mb"] > 0

    # the three graphs read one external-data file: the compiles kept the export's references
    files = sorted(p.name for p in tmp_path.iterdir())
    data = [f for f in files if f.endswith(".data")]
    assert len(data) == 1 and rec["weights_bytes"] == (tmp_path / data[0]).stat().st_size
    graphs = {v: tmp_path / f"{case.key()}{v}.onnx" for v in ("", ".dense", ".mix")}
    for g in graphs.values():
        proto = onnx.load(str(g), load_external_data=False)
        assert {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"} == set(data)

    # what was timed is the same model: all-dense == raw, the mix is the profile (not the raw graph)
    S, rng = t.seq_len, np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((1, S, 128), dtype=np.float32),
             "position_ids": np.broadcast_to(np.arange(S), (3, 1, S)).copy(), "attention_mask": np.ones((1, S), np.int64),
             **{f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 32), np.float32) for i in range(3) for kv in ("key", "value")}}
    logits, last_values = {}, {}
    for v, g in graphs.items():
        s = ort.InferenceSession(str(g))
        extra = {"image_spans": t.spans} if v else {}
        logits[v], last_values[v] = s.run(["logits", "present.2.value"], {**feeds, **extra})
    assert np.abs(logits[""]).max() > 0.1
    assert logits[""].shape == (1, 1, 700)  # the last position only, as bs-export writes it by default
    np.testing.assert_allclose(logits[".dense"], logits[""], atol=1e-5)
    assert rec["dense_vs_raw_max_abs_logit_diff"] < 1e-5
    # the profile changes image tokens' outputs from layer 1 on: layer 2's cache at the image positions,
    # and through layer 2's text queries the last position's logits (by less: two norms and the LM head later)
    np.testing.assert_allclose(last_values[".dense"], last_values[""], atol=1e-5)
    assert np.abs(last_values[".mix"] - last_values[""]).max() > 1e-3
    assert np.abs(logits[".mix"] - logits[""]).max() > 1e-5
    # the memory goal's KV cache is what the prompt's prefill returns as presents
    presents = [o.name for o in s.get_outputs() if o.name.startswith("present")]
    assert rec["kv_cache_bytes"] == sum(x.nbytes for x in s.run(presents, {**feeds, "image_spans": t.spans}))
    assert "goal: weights" in render_model(rec)

    # a prefill in chunks through the KV cache (the bench's --chunk-size) gives one call's logits, on every graph
    from blindsight.bench.model import prefill

    for v, g in graphs.items():
        s = ort.InferenceSession(str(g))
        f = {**feeds, **({"image_spans": t.spans} if v else {})}
        for chunk in (5, 16, S - 1):
            np.testing.assert_allclose(prefill(s, f, chunk), logits[v], rtol=0, atol=1e-4, err_msg=f"{v} chunk {chunk}")


def test_model_level_runs_chunked_and_shrunk(tmp_path):
    from blindsight.bench.model import ModelCase, run
    from blindsight.bench.render import render_model

    small = {**SMALL, "text_config": {**SMALL["text_config"], "num_hidden_layers": 2}}
    rec = run(ModelCase("qwen2-vl-2b", 2, 24, "fp32", small, chunk=10), tmp_path, threads=1, repeats=1, decode_repeats=1,
              native=False, memory=False)
    assert rec["chunk"] == 10 and rec["num_layers"] == 2 and "prefill in chunks of 10 tokens" in render_model(rec)


def test_model_level_bad_input_is_one_line():
    import subprocess
    import sys

    code = "import sys; from blindsight.bench.cli import main; sys.exit(main(sys.argv[1:]))"
    for args, msg in ((["--model-images", "0"], "--model-images"), (["--image-blocks"], "op-level option"),
                      (["--model-config", "qwen2-vl-72b"], "invalid choice"), (["--chunk-size", "0"], "--chunk-size"),
                      (["--model-layers", "1"], "--model-layers")):
        r = subprocess.run([sys.executable, "-c", code, "--level", "model", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_model_level_without_the_raw_export_compares_with_all_dense(tmp_path):
    """--model-graphs dense,mix (long prompts at full depth): the raw export is built (it is the
    source) but neither timed nor decoded; decode compares the mix with the all-dense compile."""
    from blindsight.bench.model import ModelCase, run
    from blindsight.bench.render import render_model

    case = ModelCase("qwen2-vl-2b", 2, 24, "fp32", SMALL)
    rec = run(case, tmp_path, threads=1, repeats=1, decode_repeats=1, native=False, memory=False, graphs=("dense", "mix"))
    assert set(rec["ttft_s"]) == {"dense", "mix"} and set(rec["decode_s"]) == {"dense", "mix", "mix-plain"}
    assert rec["decode_baseline"] == "dense" and rec["dense_vs_raw_max_abs_logit_diff"] is None
    assert rec["decode_ratio"] == pytest.approx(rec["decode_s"]["dense"] / rec["decode_s"]["mix"])
    assert "vs_raw_export" not in rec and rec["weights_bytes"] > 0
    table = render_model(rec)
    assert "raw export" not in table and "vs dense" in table and "plain session.run" in table


def test_model_level_decode_step_is_the_plain_run_with_its_cache_in_buffers(tmp_path):
    """The decode step the model level times (the pipeline's: the cache in buffers that
    ONNX Runtime writes into) computes what a plain session.run does from the same
    random cache: the same logits, and its cache grows by one token per call."""
    from blindsight.bench.model import ModelCase, _inputs, build, decode_step, open_sessions

    case = ModelCase("qwen2-vl-2b", 2, 24, "fp32", SMALL)
    dims, t = case.dims(), case.template
    sess = open_sessions({"mix": build(case, tmp_path, progress=False)["mix"]}, threads=1, native=False)["mix"]
    plain = sess.run(["logits", "present.2.value"], _inputs(sess, t, dims, "fp32", t.seq_len, seed=2))
    step = decode_step(sess, t, dims, "fp32", steps=2)
    first = step()
    np.testing.assert_allclose(first["logits"], plain[0], rtol=0, atol=1e-6)
    assert np.abs(first["logits"] - step()["logits"]).max() > 0  # the second call sees one more token
    assert plain[1].shape[2] == t.seq_len + 1
