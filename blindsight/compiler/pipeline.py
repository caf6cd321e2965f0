"""bs-compile as a function: load -> find attention -> apply profile -> lower -> save."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from blindsight import profile as profile_io
from blindsight.errors import ModelError
from blindsight.passes.lower import LOWERINGS, MIN_OPSET, is_blindsight, lower_model
from blindsight.passes.op import DOMAIN, SPANS_INPUT
from blindsight.passes.repeat_kv import look_through_repeat_kv
from blindsight.passes.rules import attention_rules
from blindsight.profile import Profile
from blindsight.semantics import CATEGORIES


@dataclasses.dataclass
class CompileResult:
    output: Path
    num_nodes: int
    counts: dict[str, int]
    lowering: str

    def summary(self) -> str:
        cats = ", ".join(f"{c} {self.counts.get(c, 0)}" for c in CATEGORIES)
        return (
            f"rewrote {self.num_nodes} attention nodes into BlindSightAttention "
            f"({self.lowering} lowering; heads: {cats}) -> {self.output}"
        )


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".blindsight.onnx")


def load_model(path: Path) -> ir.Model:
    """Load without reading external weights (they stay lazy references)."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None
    if not proto.graph.node:
        raise ModelError(f"{path} is not a readable ONNX model (it holds no graph nodes); re-export it")
    return _with_base_dir(proto, path)


def _with_base_dir(proto: onnx.ModelProto, path: Path) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(path.parent)
    return model


def _has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    model.graph.sort()
    return [n for n in model.graph if is_blindsight(n)]


def _set_attr(node: ir.Node, name: str, value) -> None:
    if isinstance(value, list):
        node.attributes[name] = ir.Attr(name, ir.AttributeType.STRINGS, value)
    else:
        node.attributes[name] = ir.Attr(name, ir.AttributeType.INT, int(value))


def compile_model(
    model_path,
    profile: Profile | str | os.PathLike,
    output=None,
    lowering: str = "fast",
) -> CompileResult:
    """Compile ``model_path`` with ``profile``; writes the output atomically."""
    if lowering not in LOWERINGS:
        raise ModelError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    model_path = Path(model_path)
    output = Path(output) if output is not None else default_output(model_path)
    if output.resolve() == model_path.resolve():
        raise ModelError(f"output path {output} is the input model; choose another with -o")
    if not isinstance(profile, Profile):
        profile = profile_io.load(profile)
    model = load_model(model_path)

    if any(v.name == SPANS_INPUT for v in model.graph.inputs) or any(
        n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)
    ):
        raise ModelError(f"{model_path} is already compiled (it has BlindSightAttention nodes); compile the original export")
    if _has_external_data(model) and output.resolve().parent != model_path.resolve().parent:
        raise ModelError(
            f"{model_path} keeps its weights in external data; write the output into the same folder "
            f"({model_path.parent}) so its references stay valid"
        )
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ModelError(f"{model_path} uses ONNX opset {opset}; BlindSight needs opset >= {MIN_OPSET} (re-export with a newer opset)")

    attention_rules().apply_to_model(model)
    look_through_repeat_kv(model)
    RemoveUnusedNodesPass()(model)
    nodes = _attention_nodes(model)
    if not nodes:
        raise ModelError(f"no attention core found in {model_path}: nothing to compile (is it a language-model export?)")

    profile.check_model(
        len(nodes),
        [n.attributes["num_heads"].value for n in nodes],
        [n.attributes["kv_num_heads"].value for n in nodes],
    )
    spans = ir.Value(name=SPANS_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["num_images", 2]))
    model.graph.inputs.append(spans)
    for layer, (node, cats) in enumerate(zip(nodes, profile.layers)):
        _set_attr(node, "categories", list(cats))
        _set_attr(node, "layer", layer)
        _set_attr(node, "sink_tokens", profile.sink_tokens)
        node.name = f"blindsight_attention_{layer}"
        node.resize_inputs(5)
        node.replace_input_with(4, spans)
    lower_model(model, lowering)
    if model.ir_version > 10:
        model.ir_version = 10  # ONNX Runtime 1.31 reads IR <= 10 with functions/overloads
    _save_atomically(model, output)
    counts = profile.counts()
    return CompileResult(output, len(nodes), counts, lowering)


def _save_atomically(model: ir.Model, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        ir.save(model, tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
