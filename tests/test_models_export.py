"""Export tests for blindsight.models: tiny random VLM language models -> ONNX.

Every (family, form) pair is exported once per session (``exports`` fixture)
and checked for numerics against the torch module and for the expected
attention structure of its form.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

try:  # allow running plain `pytest` from the repo root without installing
    import blindsight.models  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from blindsight.models import (  # noqa: E402
    FAMILIES,
    FORMS,
    example_inputs,
    export_language_model,
    load_language_model,
    text_dims,
    tiny_config,
)
from blindsight.runtime.session import make_session  # noqa: E402

INPUTS = ("inputs_embeds", "position_ids", "attention_mask")
ATOL = 1e-4


# --------------------------------------------------------------------------- #
# helpers / fixtures
# --------------------------------------------------------------------------- #
def _attn_impl(form: str) -> str:
    return "eager" if form == "eager" else "sdpa"


def _torch_logits(module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def _ort_logits(path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    sess = make_session(path)
    return sess.run(["logits"], inputs)[0]


def _consumers(model):
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(model):
    return {o: node for node in model.graph.node for o in node.output}


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


PAIRS = [(fam, form) for fam in FAMILIES for form in FORMS]


# --------------------------------------------------------------------------- #
# configs / dims
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_dims(family):
    cfg = tiny_config(family)
    dims = text_dims(family, cfg)
    assert dims["num_layers"] == 2
    assert dims["num_heads"] == 4 and dims["num_kv_heads"] == 2
    assert dims["head_dim"] == 16 and dims["hidden_size"] == 64
    assert len(dims["layer_types"]) == 2
    if family == "gemma3":
        assert dims["sliding_window"] == 8
        assert "sliding_attention" in dims["layer_types"] and "full_attention" in dims["layer_types"]
    else:
        assert dims["sliding_window"] is None
        assert set(dims["layer_types"]) == {"full_attention"}
        rope = cfg.get_text_config().rope_parameters
        assert sum(rope["mrope_section"]) == dims["head_dim"] // 2

    mha = text_dims(family, tiny_config(family, num_kv_heads=4, num_layers=3))
    assert mha["num_kv_heads"] == mha["num_heads"] == 4 and mha["num_layers"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_example_inputs(family):
    cfg = tiny_config(family)
    inp = example_inputs(family, cfg, 2, 7)
    assert inp["inputs_embeds"].shape == (2, 7, 64) and inp["inputs_embeds"].dtype == np.float32
    assert inp["attention_mask"].shape == (2, 7) and inp["attention_mask"].dtype == np.int64
    expected_pos = (3, 2, 7) if family != "gemma3" else (2, 7)
    assert inp["position_ids"].shape == expected_pos and inp["position_ids"].dtype == np.int64


def test_gemma3_sliding_window_matters():
    """With window 8 and 40 tokens, the sliding layer must change the logits."""
    import copy

    cfg = tiny_config("gemma3")
    wide = copy.deepcopy(cfg)
    wide.sliding_window = 4096
    inp = example_inputs("gemma3", cfg, 1, 40)
    a = _torch_logits(load_language_model("gemma3", cfg, "sdpa"), inp)
    b = _torch_logits(load_language_model("gemma3", wide, "sdpa"), inp)
    assert np.abs(a[:, :8] - b[:, :8]).max() < 1e-6  # inside the window: identical
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-2  # beyond it: different


# --------------------------------------------------------------------------- #
# export numerics + interface
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("family,form", PAIRS)
def test_export_matches_torch(exports, family, form):
    path = exports.path(family, form)
    module = exports.module(family, _attn_impl(form))
    cfg = tiny_config(family)

    model = onnx.load(str(path))
    assert model.ir_version <= 10
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    ), "weights must be embedded"
    # Gemma 3 also takes token_type_ids (its bidirectional image blocks)
    assert [i.name for i in model.graph.input] == list(INPUTS) + (["token_type_ids"] if family == "gemma3" else [])
    assert [o.name for o in model.graph.output] == ["logits"]
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    want_ranks = {"inputs_embeds": 3, "position_ids": 3 if family != "gemma3" else 2, "attention_mask": 2}
    assert ranks == (want_ranks | {"token_type_ids": 2} if family == "gemma3" else want_ranks)
    # batch and sequence dims are symbolic
    emb = model.graph.input[0].type.tensor_type.shape.dim
    assert emb[0].dim_param and emb[1].dim_param and emb[2].dim_value == 64

    for batch, seq, seed, spans in ((1, 40, 0, ()), (2, 23, 1, ((2, 9), (9, 15)))):
        inp = example_inputs(family, cfg, batch, seq, seed, spans=spans)
        got = _ort_logits(path, inp)
        ref = _torch_logits(module, inp)
        assert got.shape == ref.shape == (batch, seq, 128)
        assert np.abs(got - ref).max() <= ATOL


# --------------------------------------------------------------------------- #
# structure per form
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("family,form", PAIRS)
def test_export_structure(exports, family, form):
    model = onnx.load(str(exports.path(family, form)))
    dims = text_dims(family, tiny_config(family))
    n_layers = dims["num_layers"]
    counts = Counter(n.op_type for n in model.graph.node)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    prod, cons = _producers(model), _consumers(model)
    scale = dims["head_dim"] ** -0.5  # gemma3 tiny: query_pre_attn_scalar == head_dim

    if form == "attention_op":
        assert opset == 23
        attn = [n for n in model.graph.node if n.op_type == "Attention"]
        assert len(attn) == n_layers
        assert counts["Softmax"] == 0
        for node in attn:
            assert _attr(node, "is_causal") in (None, 0)
            assert abs(_attr(node, "scale") - scale) < 1e-6
            assert len(node.input) == 4 and node.input[3]  # explicit (bool) mask
        masks = {n.input[3] for n in attn}
        assert len(masks) == (2 if family == "gemma3" else 1)  # sliding vs full mask
        return

    assert opset < 23
    assert counts["Attention"] == 0
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == n_layers
    for sm in softmaxes:
        assert _attr(sm, "axis") == -1
        add = prod[sm.input[0]]
        assert add.op_type == "Add"
        if form == "decomposed":
            assert counts["IsNaN"] == n_layers
            qk = prod[add.input[0]]
            assert qk.op_type == "MatMul"
            for operand in qk.input:  # Q * sqrt(scale), K^T * sqrt(scale)
                mul = prod[operand]
                assert mul.op_type == "Mul"
            mask = prod[add.input[1]]
            assert mask.op_type == "Where"  # bool mask -> (0, -FLT_MAX)
            (isnan,) = [c for c in cons[sm.output[0]] if c.op_type == "IsNaN"]
            (where,) = cons[isnan.output[0]]
            assert where.op_type == "Where" and where.input[2] == sm.output[0]
            (pv,) = cons[where.output[0]]
            assert pv.op_type == "MatMul"
        else:  # eager
            assert counts["IsNaN"] == 0
            mul = prod[add.input[0]]
            assert mul.op_type == "Mul"
            assert prod[mul.input[0]].op_type == "MatMul"
            assert prod[add.input[1]].op_type == "Where"
            (pv,) = cons[sm.output[0]]
            assert pv.op_type == "MatMul"


def test_non_gqa_export(exports):
    """num_kv_heads == num_heads: exports, matches torch, no repeat_kv Expand on K/V."""
    family, form = "qwen2_vl", "attention_op"
    path = exports.path(family, form, num_kv_heads=4)
    model = onnx.load(str(path))
    prod = _producers(model)
    for node in model.graph.node:
        if node.op_type == "Attention":
            assert prod[node.input[1]].op_type != "Reshape"  # no Expand+Reshape repeat_kv
    inp = example_inputs(family, tiny_config(family, num_kv_heads=4), 1, 40)
    ref = _torch_logits(exports.module(family, "sdpa", num_kv_heads=4), inp)
    assert np.abs(_ort_logits(path, inp) - ref).max() <= ATOL


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_load_from_checkpoint_dir(tmp_path, family):
    """A local HF checkpoint directory loads like a config (local_files_only)."""
    from blindsight.models.export import _model_class, _split_model

    cfg = tiny_config(family)
    torch.manual_seed(0)
    hf_model = _model_class(family, cfg)._from_config(cfg, attn_implementation="sdpa").eval()
    hf_model.save_pretrained(tmp_path)
    from_dir = load_language_model(family, tmp_path, "sdpa")
    inp = example_inputs(family, cfg, 1, 12)
    ref = _torch_logits(_split_model(family, hf_model).eval(), inp)
    assert np.abs(_torch_logits(from_dir, inp) - ref).max() < 1e-6
    dims = text_dims(family, from_dir.decoder.config)
    assert dims == text_dims(family, cfg)
