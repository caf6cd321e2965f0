"""The compiler feeds BlindSightAttention the un-repeated K/V of GQA exports."""

import numpy as np
import onnx_ir as ir
import pytest

from _util import run, session
from blindsight.compiler.pipeline import compile_model
from blindsight.models.configs import FAMILIES, tiny_config
from blindsight.models.export import FORMS, example_inputs, text_dims
from blindsight.attention.schema import is_blindsight
from blindsight.profile import Profile


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_nodes_get_real_kv_heads(exported, family, form, tmp_path):
    src = exported(family, form)
    dims = text_dims(family, tiny_config(family))
    assert dims["num_kv_heads"] < dims["num_heads"]
    out = tmp_path / "c.onnx"
    rng = np.random.default_rng(1)
    cats = [list(rng.choice(["dense", "sink", "intra", "intra_sink"], dims["num_heads"])) for _ in range(dims["num_layers"])]
    compile_model(src, Profile(cats), out, "fast")
    model = ir.load(out)
    nodes = [n for n in model.graph if is_blindsight(n)]
    assert [n.attributes["kv_num_heads"].value for n in nodes] == [dims["num_kv_heads"]] * dims["num_layers"]
    for n in nodes:
        assert n.inputs[1].shape[1] == dims["num_kv_heads"] and n.inputs[2].shape[1] == dims["num_kv_heads"]
    # the repeat chains feeding only the attention are gone
    assert sum(n.op_type == "Expand" for n in model.graph) < sum(n.op_type == "Expand" for n in ir.load(src).graph)
    # and the result still equals the reference lowering, which sees the same graph
    ref = tmp_path / "r.onnx"
    compile_model(src, Profile(cats), ref, "reference")
    feeds = example_inputs(family, tiny_config(family), 1, 33, 0)
    feeds["image_spans"] = np.array([[2, 9], [12, 20], [24, 31]], dtype=np.int64)
    np.testing.assert_allclose(run(session(str(out)), feeds)[0], run(session(str(ref)), feeds)[0], atol=1e-5)
