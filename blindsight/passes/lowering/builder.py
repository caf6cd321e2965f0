"""A tiny NodeProto emitter for function bodies, If branches and Loop bodies.

Function bodies are generated per configuration, so names are counters
(deterministic output) and every constant is a Constant node. A branch or a
loop body is a :meth:`Builder.child`: its own node list and names, reading
the enclosing builders' values by name (ONNX outer-scope references), never
writing into them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 21  # GroupQueryAttention and everything below exist at this opset
MS_DOMAIN = "com.microsoft"


class Builder:
    """``elem_type``: the float type of the values computed (attention's dtype):
    :meth:`float` constants and :meth:`subgraph` outputs take it."""

    def __init__(self, prefix: str = "t", elem_type: int = onnx.TensorProto.FLOAT):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.elem_type = elem_type
        self.np_float = helper.tensor_dtype_to_np_dtype(elem_type)
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def child(self, name: str) -> "Builder":
        """A builder for an If branch or a Loop body nested in this one."""
        return Builder(f"{self.prefix}_{name}", self.elem_type)

    def fresh(self, hint: str = "v") -> str:
        self._n += 1
        return f"{self.prefix}_{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("c")
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def float(self, value) -> str:
        """A scalar constant in the builder's float type."""
        return self.const(value, self.np_float)

    def finite_min(self) -> float:
        """Half the most negative finite value of the float type: a masked score
        that stays finite (and far from overflow) when added to a real one."""
        import ml_dtypes

        return float(ml_dtypes.finfo(self.np_float).min) / 2

    def i64(self, *values) -> str:
        return self.const(list(values), np.int64)

    def scalar(self, value, dtype=np.int64) -> str:
        return self.const(value, dtype)

    # small conveniences used across lowerings -------------------------
    def shape_dim(self, x: str, axis: int) -> str:
        """Scalar int64 size of one axis."""
        return self.op("Squeeze", self.op("Shape", x, start=axis, end=axis + 1), self.i64(0))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.i64(*axes))

    def concat(self, *xs: str, axis: int = 0) -> str:
        return self.op("Concat", *xs, axis=axis)

    def cast(self, x: str, to) -> str:
        return self.op("Cast", x, to=to)

    def gather(self, x: str, idx, axis: int) -> str:
        if not isinstance(idx, str):
            idx = self.const(idx, np.int64)
        return self.op("Gather", x, idx, axis=axis)

    def nonzero(self, flags: str) -> str:
        """1-D int64 positions where ``flags`` (1-D bool) is set."""
        return self.op("Squeeze", self.op("NonZero", flags), self.i64(0))

    def all_of(self, *keeps):
        """And of the given bool values, skipping None; None when none is given."""
        keeps = [k for k in keeps if k is not None]
        if not keeps:
            return None
        out = keeps[0]
        for k in keeps[1:]:
            out = self.op("And", out, k)
        return out

    def subgraph(self, name: str, outputs: list[str]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, [], [helper.make_tensor_value_info(o, self.elem_type, None) for o in outputs])
