"""The one session factory: model forms, options, provider names."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from blindsight.errors import BlindSightError
from blindsight.runtime.session import make_session, resolve_provider


def _model() -> onnx.ModelProto:
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", f, [2])], [helper.make_tensor_value_info("y", f, [2])])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("form", ["proto", "bytes", "path", "str"])
def test_accepts_a_path_bytes_or_a_model_proto(tmp_path, form):
    model = _model()
    onnx.save(model, tmp_path / "m.onnx")
    arg = {"proto": model, "bytes": model.SerializeToString(), "path": tmp_path / "m.onnx",
           "str": str(tmp_path / "m.onnx")}[form]
    sess = make_session(arg)
    out = sess.run(None, {"x": np.array([-1.0, 2.0], dtype=np.float32)})[0]
    np.testing.assert_array_equal(out, [0.0, 2.0])
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_applies_the_options():
    opts = make_session(_model(), threads=3, inter_threads=1, arena=False, log_severity=3).get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 1)
    assert not opts.enable_cpu_mem_arena and opts.log_severity_level == 3
    default = make_session(_model()).get_session_options()
    assert (default.intra_op_num_threads, default.inter_op_num_threads) == (0, 0)
    assert default.enable_cpu_mem_arena and not default.enable_profiling


def test_short_and_onnxruntime_provider_names():
    assert resolve_provider("cpu") == resolve_provider("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert make_session(_model(), provider="CPUExecutionProvider").get_providers() == ["CPUExecutionProvider"]


def test_unknown_provider_is_one_line():
    with pytest.raises(BlindSightError) as exc:
        make_session(_model(), provider="tpu")
    assert str(exc.value) == "unknown provider 'tpu'; choose one of cpu, cuda, rocm, migraphx"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        for name in ("cuda", "CUDAExecutionProvider"):
            with pytest.raises(BlindSightError, match="execution provider 'cuda' is not available"):
                make_session(_model(), provider=name)
