"""bs-check: dense mode (an all-dense compile against its source), lowering
mode (fast against reference of one sparse profile), KV-cache inputs, broken graphs and bad
input, on real tiny exports."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from _util import session
from blindsight.compiler.pipeline import compile_model
from blindsight.profile import Profile
from blindsight.runtime.parity import check, main

SEQ = 24
SPANS = np.array([[2, 10], [13, 22]], dtype=np.int64)


@pytest.fixture(scope="module")
def models(exported, tmp_path_factory):
    """The tiny Qwen2-VL eager export (2 layers x 4 heads) and its compiles."""
    root = tmp_path_factory.mktemp("check")
    src = exported("qwen2_vl", "eager")
    out = {"source": src, "dense": root / "dense.onnx"}
    compile_model(src, Profile.uniform("dense", 2, 4), out["dense"])
    for lowering in ("fast", "reference"):
        out[lowering] = root / f"mixed.{lowering}.onnx"
        compile_model(src, Profile.mixed(2, 4), out[lowering], lowering=lowering)
    out["rotated"] = root / "rotated.fast.onnx"  # another profile: layer 1's heads shifted
    compile_model(src, Profile.mixed(2, 4, rotate=True), out["rotated"])
    out["root"] = root
    return out


def _feeds(batch=1, seq=SEQ, seed=5):
    rng = np.random.default_rng(seed)
    return {
        "inputs_embeds": rng.standard_normal((batch, seq, 64)).astype(np.float32),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)).copy(),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }


def _numpy_errors(ref_path, out_path, feeds, spans):
    """The two sessions' logits, compared here, independently of the tool."""
    outs = []
    for path in (ref_path, out_path):
        sess = session(path)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feeds.items() if k in names}
        if "image_spans" in names:
            f["image_spans"] = spans
        outs.append(sess.run(["logits"], f)[0].astype(np.float64))
    r, a = outs
    diff = np.abs(a - r)
    return diff.max(), (diff / np.maximum(np.abs(r), 1)).max(), np.mean(r.argmax(-1) == a.argmax(-1))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode,ref,out", [("dense", "source", "dense"), ("lowering", "reference", "fast")])
def test_mode_passes_and_agrees_with_numpy(models, mode, ref, out, batch):
    """The tool's errors equal a numpy computation on the two sessions' outputs."""
    feeds = _feeds(batch)
    # on the function bodies, as the numpy side's sessions run (tests/test_native.py checks the kernel)
    report = check(models[ref], models[out], feeds=feeds, spans=SPANS, threads=2, native=False)
    assert report.mode == mode and report.passed and not report.note
    (logits,) = report.outputs
    max_abs, max_rel, top1 = _numpy_errors(models[ref], models[out], feeds, SPANS)
    print(f"{mode} batch {batch}: max abs {logits.max_abs:.3g}, max rel {logits.max_rel:.3g}, top-1 {logits.top1}")
    assert logits.max_abs == pytest.approx(max_abs, abs=1e-12)
    assert logits.max_rel == pytest.approx(max_rel, abs=1e-12)
    assert logits.top1 == top1 == 1.0
    assert logits.max_rel <= logits.tolerance == 1e-4
    assert logits.shape == [batch, SEQ, 128]


def test_sparse_profile_is_visible(models):
    """The mixed profile really differs from dense on these spans: far above the tolerance."""
    dense_abs, _, _ = _numpy_errors(models["source"], models["fast"], _feeds(), SPANS)
    print(f"mixed profile vs dense: max abs {dense_abs:.3g}")
    assert dense_abs > 10 * 1e-4


def test_cli_random_feeds_table_and_json(models, capsys):
    assert main([str(models["source"]), str(models["dense"]), "--seq-len", "20", "--images", "3", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "dense mode" in out and "logits" in out and "all outputs within tolerance" in out
    assert main([str(models["reference"]), str(models["fast"]), "--batch", "2", "--spans", "1:9,12:20", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["mode"] == "lowering" and rec["passed"] and rec["spans"] == [[1, 9], [12, 20]]
    assert rec["feeds"]["inputs_embeds"] == [2, 32, 64] and rec["feeds"]["position_ids"] == [3, 2, 32]
    assert rec["outputs"][0]["top1"] == 1.0


def test_npz_feeds(models, tmp_path, capsys):
    path = tmp_path / "f.npz"
    np.savez(path, image_spans=SPANS, **_feeds())
    assert main([str(models["source"]), str(models["dense"]), "--feeds", str(path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["spans"] == SPANS.tolist() and rec["feeds"]["inputs_embeds"] == [1, SEQ, 64]


def _scaled_copy(src, dst, factor=1.01):
    """A compiled model whose final norm weight is scaled: every logit moves."""
    m = onnx.load(str(src))
    init = next(t for t in reversed(m.graph.initializer) if "norm" in t.name)
    arr = onnx.numpy_helper.to_array(init) * factor
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(m, str(dst))
    return dst


def test_broken_graph_fails_naming_output(models, tmp_path, capsys):
    broken = _scaled_copy(models["dense"], tmp_path / "broken.onnx")
    assert main([str(models["source"]), str(broken), "--spans", "2:10"]) == 1
    cap = capsys.readouterr()
    assert "FAIL" in cap.out and "over tolerance: logits" in cap.out
    assert "bs-check: logits differs" in cap.err
    # a forced tolerance wide enough passes the same pair
    assert main([str(models["source"]), str(broken), "--spans", "2:10", "--tolerance", "1"]) == 0


def test_different_profile_fails_in_lowering_mode(models, capsys):
    code = main([str(models["reference"]), str(models["rotated"]), "--spans", "2:10,13:22", "--seq-len", str(SEQ)])
    cap = capsys.readouterr()
    assert code == 1 and "bs-check: logits differs" in cap.err and "different profiles" in cap.out


def test_sparse_compile_fails_dense_mode(models, capsys):
    assert main([str(models["source"]), str(models["fast"]), "--spans", "2:10,13:22", "--seq-len", str(SEQ)]) == 1
    assert "sparse heads" in capsys.readouterr().out


def _retyped(src, dst):
    m = onnx.load(str(src))
    next(i for i in m.graph.input if i.name == "inputs_embeds").type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(m, str(dst))
    return dst


def _npz(path, **change):
    feeds = _feeds()
    for k, v in change.items():
        if v is None:
            feeds.pop(k)
        else:
            feeds[k] = v
    np.savez(path, **feeds)
    return str(path)


BAD = {
    "missing source": (lambda m, t: ["nope.onnx", m["dense"]], "SOURCE model file not found"),
    "not onnx": (lambda m, t: [m["source"], t / "x.onnx"], "not a readable ONNX model"),
    "not compiled": (lambda m, t: [m["source"], m["source"]], "no 'image_spans' input"),
    "input dtypes": (lambda m, t: [m["source"], _retyped(m["dense"], t / "fp16.onnx")], "'inputs_embeds' is float32"),
    "npz missing input": (lambda m, t: [m["source"], m["dense"], "--feeds", _npz(t / "a.npz", attention_mask=None)],
                          "lacks the inputs attention_mask"),
    "npz dtype": (lambda m, t: [m["source"], m["dense"], "--feeds",
                                _npz(t / "b.npz", attention_mask=np.ones((1, SEQ), np.int32))], "is int32"),
    "npz shape": (lambda m, t: [m["source"], m["dense"], "--feeds",
                                _npz(t / "c.npz", inputs_embeds=np.zeros((1, SEQ, 65), np.float32))], "dim 2 must be 64"),
    "npz lengths": (lambda m, t: [m["source"], m["dense"], "--feeds",
                                  _npz(t / "d.npz", attention_mask=np.ones((1, SEQ + 1), np.int64))], "seq length"),
    "npz missing": (lambda m, t: [m["source"], m["dense"], "--feeds", t / "none.npz"], "feeds file not found"),
    "span outside": (lambda m, t: [m["source"], m["dense"], "--seq-len", "32", "--spans", "30:40"], "ends past the prompt of 32"),
    "span syntax": (lambda m, t: [m["source"], m["dense"], "--spans", "3-20"], "is not START:END"),
    "too many images": (lambda m, t: [m["source"], m["dense"], "--seq-len", "4", "--images", "5"], "do not fit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(models, tmp_path, capsys, case):
    (tmp_path / "x.onnx").write_text("not a model")
    argv, message = BAD[case]
    code = main([str(a) for a in argv(models, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("bs-check: error: ") and err.count("\n") == 1 and message in err, err


def test_mismatched_graphs_and_subprocess(models, kv_export):
    """Different inputs (a KV-cache graph against a prefill one), run as a command: one line, exit 2."""
    lm, dense = kv_export
    proc = subprocess.run([sys.executable, "-m", "blindsight.runtime.parity", str(models["source"]), str(dense)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "different inputs" in proc.stderr and "past_key_values.0.key" in proc.stderr


@pytest.fixture(scope="module")
def kv_export(tmp_path_factory):
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp("check_kv")
    out = export_vlm(make_tiny_checkpoint("qwen2_vl", root / "ckpt", seed=3), root / "export", progress=False).out_dir
    lm = out / "language_model.onnx"
    dense = out / "language_model.dense.onnx"
    compile_model(lm, Profile.uniform("dense", 2, 4), dense)
    return lm, dense


def test_kv_cache_past(kv_export, capsys):
    lm, dense = kv_export
    assert main([str(lm), str(dense), "--past", "3", "--seq-len", "16", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["feeds"]["past_key_values.0.key"] == [1, 2, 3, 16] and rec["feeds"]["attention_mask"] == [1, 19]
    names = {o["name"]: o for o in rec["outputs"]}
    assert set(names) == {"logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"}
    assert names["present.0.key"]["shape"] == [1, 2, 19, 16] and names["logits"]["top1"] == 1.0
    assert all(o["passed"] for o in rec["outputs"])
    assert all(s[1] <= 19 for s in rec["spans"])
