"""bs-compile as a function: load, run the passes in order, save.

The passes (:data:`PASSES`), each returning how many places it changed, like
onnxscript's ``fuse_xformers``: rewrite the attention cores into
BlindSightAttention nodes, look through ``repeat_kv``, drop what became
unused, annotate the nodes from the profile, give them function bodies."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from blindsight import profile as profile_io
from blindsight.errors import ModelError
from blindsight.attention import CATEGORIES
from blindsight.attention.schema import DOMAIN, SPANS_INPUT
from blindsight.passes.annotate import annotate, attention_nodes, exported_image_blocks
from blindsight.passes.lower import lower_model
from blindsight.passes.lowering import LOWERINGS, MIN_OPSET
from blindsight.passes.repeat_kv import look_through_repeat_kv
from blindsight.passes.rules import attention_rules
from blindsight.profile import Profile


@dataclasses.dataclass
class CompileResult:
    output: Path
    num_nodes: int
    counts: dict[str, int]  # heads per category
    lowering: str
    passes: dict[str, int] = dataclasses.field(default_factory=dict)  # what each pass changed

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


def external_data_files(proto: onnx.ModelProto) -> set[str]:
    """The external data files a graph's initializers name (relative to its folder)."""
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def _has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the passes read besides the graph."""

    profile: Profile
    lowering: str
    source: Path
    #: Gemma 3's bidirectional image blocks; None: as the export's metadata says
    image_blocks: bool | None = None


def _annotate(model: ir.Model, opts: CompileOptions) -> int:
    if not attention_nodes(model):
        raise ModelError(f"no attention core found in {opts.source}: nothing to compile (is it a language-model export?)")
    blocks = exported_image_blocks(model) if opts.image_blocks is None else opts.image_blocks
    return annotate(model, opts.profile, image_blocks=blocks)


def _remove_unused(model: ir.Model, opts: CompileOptions) -> int:
    before = sum(1 for _ in model.graph)
    RemoveUnusedNodesPass()(model)
    return before - sum(1 for _ in model.graph)


# In order; each pass takes (model, options) and returns how many places it changed.
PASSES = (
    ("rewrite", lambda model, opts: attention_rules().apply_to_model(model)),
    ("repeat_kv", lambda model, opts: look_through_repeat_kv(model)),
    ("remove_unused", _remove_unused),
    ("annotate", _annotate),
    ("lower", lambda model, opts: lower_model(model, opts.lowering)),
)


def run_passes(model: ir.Model, opts: CompileOptions) -> dict[str, int]:
    return {name: run(model, opts) for name, run in PASSES}


def compile_model(
    model_path,
    profile: Profile | str | os.PathLike,
    output=None,
    lowering: str = "fast",
    image_blocks: bool | None = None,
) -> CompileResult:
    """Compile ``model_path`` with ``profile``; writes the output atomically.
    ``image_blocks``: whether the model's image tokens attend bidirectionally
    within their block (Gemma 3); None reads it from the export's metadata."""
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

    counts = run_passes(model, CompileOptions(profile, lowering, model_path, image_blocks))
    if model.ir_version > 10:
        model.ir_version = 10  # ONNX Runtime 1.31 reads IR <= 10 with functions/overloads
    _save_atomically(model, output)
    return CompileResult(output, counts["annotate"], profile.counts(), lowering, counts)


def _save_atomically(model: ir.Model, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        ir.save(model, tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
