"""Export dtypes (``bs-export --dtype``) and the one graph fix-up half-precision exports need.

The model is cast (``model.to(torch.float16)``) before ``torch.onnx.export``,
so every float input, output, weight and activation is in that dtype, apart
from the fp32 islands the transformers code itself keeps (norms that upcast,
rotary tables, eager softmax; docs/export-contract.md lists them).

:func:`cast_mixed_norms` fixes what the exporter emits for a norm that upcasts
(Gemma 3's ``x.float()`` RMSNorm): at opset 23 it becomes one
``RMSNormalization`` node with an fp16 ``X`` and an fp32 ``scale``. ONNX
allows that (``X``: T, ``scale``/``Y``: V), but the operator's function body,
which ONNX Runtime expands, multiplies a T-typed value by the V-typed scale,
and the session refuses the graph ("Type parameter (T) of Optype (Mul) bound
to different types (tensor(float16) and tensor(float)"). A ``Cast`` of ``X`` to
the scale's dtype is exactly the upcast the torch module performs.
"""

from __future__ import annotations

from blindsight.attention.schema import SHORT_DTYPES

DTYPES = tuple(SHORT_DTYPES)
#: opset of bfloat16 vision exports: ONNX ``Conv`` (the patch embeddings) accepts
#: bfloat16 from opset 22; at the exporter's default (18) the graph is invalid
BF16_VISION_OPSET = 23
#: numpy / ONNX-style names, as template.json records them
DTYPE_NAMES = SHORT_DTYPES


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype


def torch_dtype(dtype: str):
    import torch

    return getattr(torch, DTYPE_NAMES[check_dtype(dtype)])


def vision_opset(dtype) -> dict:
    """Extra ``torch.onnx.export`` arguments for a vision tower of torch ``dtype``."""
    import torch

    return {"opset_version": BF16_VISION_OPSET} if dtype == torch.bfloat16 else {}


def cast_floats(args, dtype):
    """``args`` (tensors, nested tuples of tensors) with every float tensor cast to ``dtype``."""
    if isinstance(args, (tuple, list)):
        return type(args)(cast_floats(a, dtype) for a in args)
    return args.to(dtype) if args.is_floating_point() else args


def cast_mixed_norms(model) -> int:
    """Insert ``Cast(X -> scale dtype)`` before every ``RMSNormalization`` whose
    input and scale dtypes differ; ``model`` is an onnx-ir Model, changed in
    place. Returns the number of casts inserted."""
    import onnx_ir as ir

    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "RMSNormalization" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, scale = node.inputs[0], node.inputs[1]
        if x is None or scale is None or x.dtype is None or scale.dtype is None or x.dtype == scale.dtype:
            continue
        cast = ir.node("Cast", [x], {"to": scale.dtype}, name=f"{node.name or 'RMSNormalization'}_cast_input_{count}")
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = f"{x.name}_as_{scale.dtype.name.lower()}_{count}", scale.dtype, x.shape
        node.graph.insert_before(node, cast)
        node.replace_input_with(0, out)
        count += 1
    return count
