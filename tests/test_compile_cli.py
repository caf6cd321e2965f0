"""bs-compile's command line: success output, and one clear line for each bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _util import run, session
from blindsight.errors import SpanError
from blindsight.models.configs import tiny_config
from blindsight.models.export import example_inputs, text_dims
from blindsight.profile import Profile, save
from blindsight.runtime.session import CompiledSession


def bs_compile(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blindsight.compiler.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def model(exported, tmp_path_factory):
    """A tiny Qwen2-VL export and a matching profile in a scratch folder."""
    root = tmp_path_factory.mktemp("cli")
    src = root / "lm.onnx"
    src.write_bytes(Path(exported("qwen2_vl", "eager")).read_bytes())
    dims = text_dims("qwen2_vl", tiny_config("qwen2_vl"))
    layers = [["intra", "sink", "intra_sink", "dense"], ["sink"] * 4]
    save(Profile(layers, num_kv_heads=dims["num_kv_heads"]), root / "p.json")
    return src, root / "p.json", dims


def test_compile_prints_summary_and_is_deterministic(model, tmp_path):
    src, prof, dims = model
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    r = bs_compile(src, "--profile", prof, "-o", a)
    assert r.returncode == 0, r.stderr
    assert "rewrote 2 attention nodes" in r.stdout and "sink 5" in r.stdout and "intra 1" in r.stdout
    assert bs_compile(src, "--profile", prof, "-o", b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files left
    onnx.checker.check_model(str(a))
    inputs = {i.name: i for i in onnx.load(str(a)).graph.input}
    assert inputs["image_spans"].type.tensor_type.elem_type == TensorProto.INT64


def _assert_clean_failure(r, out: Path, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def _profile_file(tmp_path, doc):
    p = tmp_path / "bad.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def _doc(**over):
    d = {"format": "blindsight-profile", "version": 1, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "sink_tokens": 1, "layers": [["dense"] * 4, ["intra"] * 4]}
    d.update(over)
    return d


@pytest.mark.parametrize(
    "profile_doc,needles",
    [
        ("{\"format\": ", ["not valid JSON"]),
        (_doc(format="x"), ["'format'"]),
        (_doc(version=7), ["'version' is 7"]),
        (_doc(layers=[["dense"] * 4, ["intra", "dense", "wide", "dense"]]), ["layer 1, head 2", "'wide'"]),
        (_doc(num_layers=3, layers=[["dense"] * 4] * 3), ["3 layers", "2 attention layers"]),
        (_doc(num_heads=2, num_kv_heads=1, layers=[["dense"] * 2] * 2), ["layer 0", "2 heads", "4 query heads"]),
    ],
)
def test_bad_profiles(model, tmp_path, profile_doc, needles):
    src, _, _ = model
    out = tmp_path / "out.onnx"
    _assert_clean_failure(bs_compile(src, "--profile", _profile_file(tmp_path, profile_doc), "-o", out), out, *needles)


def test_missing_and_corrupt_models(model, tmp_path):
    _, prof, _ = model
    out = tmp_path / "out.onnx"
    _assert_clean_failure(bs_compile(tmp_path / "nope.onnx", "--profile", prof, "-o", out), out, "not found")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _assert_clean_failure(bs_compile(bad, "--profile", prof, "-o", out), out, "not a readable ONNX model")


def test_model_without_attention(model, tmp_path):
    _, prof, _ = model
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    plain = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    out = tmp_path / "out.onnx"
    _assert_clean_failure(bs_compile(plain, "--profile", prof, "-o", out), out, "no attention core")


def test_already_compiled_and_same_path(model, tmp_path):
    src, prof, _ = model
    first = tmp_path / "c.onnx"
    assert bs_compile(src, "--profile", prof, "-o", first).returncode == 0
    out = tmp_path / "again.onnx"
    _assert_clean_failure(bs_compile(first, "--profile", prof, "-o", out), out, "already compiled")
    before = src.read_bytes()
    r = bs_compile(src, "--profile", prof, "-o", src)
    assert r.returncode != 0 and "is the input model" in r.stderr and "Traceback" not in r.stderr
    assert src.read_bytes() == before


def test_runtime_rejects_invalid_spans(model, tmp_path):
    src, prof, _ = model
    out = tmp_path / "c.onnx"
    assert bs_compile(src, "--profile", prof, "-o", out).returncode == 0
    sess = CompiledSession(out)
    feeds = example_inputs("qwen2_vl", tiny_config("qwen2_vl"), 1, 20)
    with pytest.raises(SpanError, match="overlaps"):
        sess.run(feeds, [(2, 8), (5, 9)], seq_len=20)
    with pytest.raises(SpanError, match="ends past"):
        sess.run(feeds, [(2, 30)], seq_len=20)
    logits = sess.run(feeds, [(2, 8), (10, 15)], seq_len=20)[0]
    assert logits.shape[:2] == (1, 20) and np.isfinite(logits).all()


def test_external_data_stays_external(model, tmp_path):
    """Weights in a side file are not loaded: the output references the same file and runs."""
    src, prof, _ = model
    proto = onnx.load(str(src))
    ext = tmp_path / "lm_ext.onnx"
    onnx.save_model(proto, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="lm_ext.data", size_threshold=1024)
    data_before = (tmp_path / "lm_ext.data").read_bytes()
    out = tmp_path / "lm_ext.blindsight.onnx"
    r = bs_compile(ext, "--profile", prof)
    assert r.returncode == 0, r.stderr
    compiled = onnx.load(str(out), load_external_data=False)
    big = [t for t in compiled.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.external_data and not t.raw_data for t in big)
    locations = {e.value for t in compiled.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"lm_ext.data"}
    assert (tmp_path / "lm_ext.data").read_bytes() == data_before
    onnx.checker.check_model(str(out))
    feeds = example_inputs("qwen2_vl", tiny_config("qwen2_vl"), 1, 16)
    feeds["image_spans"] = np.array([[2, 9]], dtype=np.int64)
    inline = tmp_path / "inline.blindsight.onnx"
    assert bs_compile(src, "--profile", prof, "-o", inline).returncode == 0
    np.testing.assert_array_equal(run(session(str(out)), feeds)[0], run(session(str(inline)), feeds)[0])
    elsewhere = tmp_path / "sub" / "x.onnx"
    _assert_clean_failure(bs_compile(ext, "--profile", prof, "-o", elsewhere), elsewhere, "same folder")


def test_compile_never_reads_the_weights(model, tmp_path):
    """With the external-data file replaced by a directory of the same
    name (any read of it fails), bs-compile still succeeds and the output keeps
    referencing that file; with the real file back, it runs like the inline compile."""
    src, prof, _ = model
    proto = onnx.load(str(src))
    ext = tmp_path / "lm_ext.onnx"
    onnx.save_model(proto, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="lm_ext.data", size_threshold=1024)
    data = tmp_path / "lm_ext.data"
    data.rename(tmp_path / "weights.bak")
    data.mkdir()  # open() of it raises IsADirectoryError, even for root
    r = bs_compile(ext, "--profile", prof)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "lm_ext.blindsight.onnx"
    compiled = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in compiled.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"lm_ext.data"}
    data.rmdir()
    (tmp_path / "weights.bak").rename(data)
    feeds = example_inputs("qwen2_vl", tiny_config("qwen2_vl"), 1, 16)
    feeds["image_spans"] = np.array([[2, 9]], dtype=np.int64)
    inline = tmp_path / "inline.blindsight.onnx"
    assert bs_compile(src, "--profile", prof, "-o", inline).returncode == 0
    np.testing.assert_array_equal(run(session(str(out)), feeds)[0], run(session(str(inline)), feeds)[0])


def test_help_explains():
    r = bs_compile("--help")
    assert r.returncode == 0 and "image_spans" in r.stdout and "--lowering" in r.stdout
