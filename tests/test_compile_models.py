"""bs-compile on exported Qwen2-VL, Qwen2.5-VL and Gemma 3 language models, all three forms."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import category_lists, run, session, templates
from blindsight.compiler.pipeline import compile_model
from blindsight.models.configs import FAMILIES, tiny_config
from blindsight.models.export import FORMS, example_inputs, text_dims
from blindsight.attention.schema import is_blindsight
from blindsight.profile import Profile
from blindsight.attention import reference_attention

CASES = [(f, m) for f in FAMILIES for m in FORMS]


def _feeds(family, seq, spans, seed=0):
    feeds = example_inputs(family, tiny_config(family), 1, seq, seed)
    feeds["image_spans"] = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return feeds


@pytest.mark.parametrize("family,form", CASES)
def test_all_dense_profile_equals_original(exported, family, form, tmp_path):
    src = exported(family, form)
    dims = text_dims(family, tiny_config(family))
    profile = Profile.uniform("dense", dims["num_layers"], dims["num_heads"], num_kv_heads=dims["num_kv_heads"])
    feeds = _feeds(family, 37, [(3, 11), (14, 30)])
    want = run(session(str(src)), feeds)[0]
    for lowering in ("fast", "reference"):
        out = tmp_path / f"{lowering}.onnx"
        result = compile_model(src, profile, out, lowering)
        assert result.num_nodes == dims["num_layers"]
        onnx.checker.check_model(str(out))
        model = onnx.load(str(out))
        assert [n.op_type for n in model.graph.node].count("BlindSightAttention") == dims["num_layers"]
        assert not any(n.op_type in ("Softmax", "Attention") for n in model.graph.node)
        got = run(session(str(out)), feeds)[0]
        assert np.abs(got - want).max() <= 1e-5, lowering


def _with_node_io(path: Path) -> bytes:
    """The compiled model with every BlindSightAttention node's inputs and output exposed."""
    model = ir.load(path)
    names = []
    for node in model.graph:
        if is_blindsight(node):
            values = [v for v in node.inputs[:4] if v is not None] + [node.outputs[0]]
            for v in values:
                if v.type is None:
                    v.type = ir.TensorType(ir.DataType.FLOAT)
                if v not in model.graph.outputs and not v.is_graph_input():
                    model.graph.outputs.append(v)
            names.append((node, [v.name for v in node.inputs[:4] if v is not None], node.outputs[0].name))
    proto = ir.serde.serialize_model(model)
    return proto.SerializeToString(), [(n.attributes["categories"].value, n.attributes["scale"].value, i, o) for n, i, o in names]


@pytest.mark.parametrize("family,form", CASES)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_profile_fast_equals_reference_and_numpy(exported, family, form, data):
    src = exported(family, form)
    dims = text_dims(family, tiny_config(family))
    spans, seq = data.draw(templates(max_images=6, max_len=8))
    seq = max(seq, 2)
    sink_tokens = data.draw(st.integers(1, 3))
    layers = [data.draw(category_lists(dims["num_heads"])) for _ in range(dims["num_layers"])]
    profile = Profile(layers, num_kv_heads=dims["num_kv_heads"], sink_tokens=sink_tokens)
    feeds = _feeds(family, seq, spans, seed=data.draw(st.integers(0, 100)))
    with tempfile.TemporaryDirectory() as tmp:
        fast, ref = Path(tmp, "fast.onnx"), Path(tmp, "ref.onnx")
        compile_model(src, profile, fast, "fast")
        compile_model(src, profile, ref, "reference")
        got_ref = run(session(str(ref)), feeds)[0]
        model_bytes, nodes = _with_node_io(fast)
    sess = session(model_bytes)
    outputs = dict(zip([o.name for o in sess.get_outputs()], run(sess, feeds)))
    assert np.abs(outputs["logits"] - got_ref).max() <= 1e-4

    # every layer's node output against the numpy reference of docs/specification.md §2 on that node's own inputs
    for cats, scale, inputs, output in nodes:
        q, k, v = (outputs[n] for n in inputs[:3])
        model_mask = None
        if len(inputs) > 3:
            m = outputs[inputs[3]]
            model_mask = m if m.dtype == bool else m > np.finfo(np.float32).min / 2
        want = reference_attention(q, k, v, spans, cats, sink_tokens=sink_tokens, scale=scale, model_mask=model_mask)
        assert np.abs(outputs[output] - want).max() <= 1e-4
