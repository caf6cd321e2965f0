"""int8 weights for the MatMuls of a graph (dynamic quantization, standard ONNX ops).

Each MatMul of a float32 activation by a constant float32 matrix W [K, N]
(and each Gemm A @ W + C, W possibly stored transposed) becomes

    DynamicQuantizeLinear(A) -> (A_q uint8, a_scale, a_zero)
    MatMulInteger(A_q, W_q int8, a_zero, 0) -> Cast(float) -> Mul(a_scale * w_scale) [-> Add(C)]

with W_q = round(W / w_scale), w_scale = max|W[:, n]| / 127 per output column
(symmetric, zero point 0). The activation is quantized per tensor at run time,
once per input value however many MatMuls read it (Q, K and V share one).
This is what ``onnxruntime.quantization.quantize_dynamic`` writes for MatMul
with ``per_channel=True`` (tests/test_quantize.py checks them equal), and
ONNX Runtime's CPU provider fuses it into one ``DynamicQuantizeMatMul``
(u8 x s8 integer GEMM). It is written here, on onnx-ir, so that weights stay
lazy references until each is quantized (``quantize_dynamic`` loads the whole
float model as one protobuf and writes a shape-inferred copy of it beside the
input), and so that the LM head can be told apart.

MatMuls whose result is a graph output stay float32 unless asked for: that
is the LM head, whose logits pick the tokens, and which the exports run on
one position. In a decode step, though, it is one of the largest weights read
(Qwen2-VL-2B: 151,936 x 1,536, 0.93 GB in float32), hence ``lm_head``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: the weight range: symmetric int8 without -128, so W_q = -W_q is representable
QMAX = 127


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W_q int8 [K, N], scale float32 [N]) with W ~ W_q * scale, per output column."""
    absmax = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / QMAX, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _plain_gemm(node: ir.Node) -> bool:
    """A Gemm that is A @ op(B) + C, the form exporters write for linear layers on 2-D inputs."""
    return (_attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0 and _attr(node, "transA", 0) == 0)


def _quantizable(node: ir.Node, outputs: set[ir.Value], lm_head: bool) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return False
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return False
    a, w = node.inputs[:2]
    tensor = w.const_value if w is not None else None
    if tensor is None or not w.is_initializer() or len(tensor.shape) != 2:
        return False
    if tensor.dtype != ir.DataType.FLOAT or a.dtype not in (ir.DataType.FLOAT, None):
        return False
    return lm_head or node.outputs[0] not in outputs


def float32_matmul_weights(model: ir.Model) -> tuple[int, int]:
    """(MatMuls with a constant float32 weight matrix, MatMuls with a constant weight of another type)."""
    f32 = other = 0
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and node.inputs[1].is_initializer():
            if node.inputs[1].const_value.dtype == ir.DataType.FLOAT:
                f32 += 1
            else:
                other += 1
    return f32, other


def quantize_matmul_weights(model: ir.Model, lm_head: bool = False) -> int:
    """Rewrite every quantizable MatMul (and plain Gemm) of the main graph; returns how many were.
    ``lm_head``: those whose result is a graph output too (the LM head).

    Function bodies are left alone: they hold no weights (the BlindSightAttention
    bodies multiply activations)."""
    graph = model.graph
    outputs = set(graph.outputs)
    shared: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
    weights: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}  # a tied weight is quantized once per orientation
    count = 0
    for node in list(graph):
        if not _quantizable(node, outputs, lm_head):
            continue
        a, w = node.inputs[:2]
        name = node.name or f"matmul_{count}"
        new: list[ir.Node] = []
        if a not in shared:
            dql = ir.node("DynamicQuantizeLinear", [a], name=f"{name}/quantize_input", num_outputs=3)
            new.append(dql)
            shared[a] = tuple(dql.outputs)
        a_q, a_scale, a_zero = shared[a]
        transposed = bool(_attr(node, "transB", 0))
        if (w, transposed) not in weights:
            matrix = w.const_value.numpy()
            w_q, w_scale = quantize_columns(matrix.T if transposed else matrix)
            stem = f"{w.name}_t" if transposed else w.name
            weights[w, transposed] = (_initializer(graph, f"{stem}_int8", w_q), _initializer(graph, f"{stem}_scale", w_scale),
                                      _initializer(graph, f"{stem}_zero_point", np.zeros(w_q.shape[1], np.int8)))
        wq_value, scale_value, zero_value = weights[w, transposed]
        mm = ir.node("MatMulInteger", [a_q, wq_value, a_zero, zero_value], name=f"{name}/int8")
        cast = ir.node("Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/to_float")
        scales = ir.node("Mul", [a_scale, scale_value], name=f"{name}/scales")
        out = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}/rescale")
        new += [mm, cast, scales, out]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            out = ir.node("Add", [out.outputs[0], bias], name=f"{name}/bias")
            new.append(out)
        graph.insert_before(node, new)
        old = node.outputs[0]
        out.outputs[0].name, old.name = old.name, f"{old.name}_float"
        out.outputs[0].shape, out.outputs[0].type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, out.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(w.name, None)
        count += 1
    if count and model.opset_imports.get("", 0) < 11:
        model.opset_imports[""] = 11  # DynamicQuantizeLinear
    return count


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value
