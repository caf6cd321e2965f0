"""Pass: give every BlindSightAttention node a model-local function body."""

from __future__ import annotations

import onnx_ir as ir

from blindsight.attention.schema import DOMAIN, OP_TYPE, OP_VERSION, AttentionConfig, is_blindsight
from blindsight.passes.lowering import build_function
from blindsight.passes.lowering.builder import MS_DOMAIN, OPSET


def lower_model(model: ir.Model, lowering: str) -> int:
    """Attach function bodies (one per distinct configuration); returns the number of nodes lowered."""
    opset = model.opset_imports.get("", OPSET)
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_blindsight(node):
            continue
        cfg = AttentionConfig.from_node(node)
        overload = cfg.overload(lowering)
        key = (DOMAIN, OP_TYPE, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(build_function(cfg, lowering, opset))
        node.overload = overload
        count += 1
    model.opset_imports[DOMAIN] = OP_VERSION
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    model.opset_imports.setdefault("", OPSET)
    return count
