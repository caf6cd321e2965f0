"""The ONNX side of bs-eval: export a model once, keep only the last position's
logits, compile it with a profile. Files are cached in a work directory and
written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx
from onnx import helper, numpy_helper
import numpy as np

from blindsight.errors import BlindSightError
from blindsight.profile import Profile


def _atomic_target(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Slice the LM head's input to the last position: logits [B, 1, V].

    Time to first token needs only the last position, and the LM head of a
    262K vocabulary over every position would cost more than the rest of the
    prefill. Everything after the slice is per-position, so values are unchanged.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    name = graph.output[0].name
    node = producer.get(name)
    # walk back through per-position ops (soft-capping) to the LM head MatMul
    while node is not None and not (node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2):
        node = next((producer[i] for i in node.input if i in producer), None)
    if node is None:
        raise BlindSightError(f"cannot find the LM head MatMul in front of the output {name!r}")
    sliced = node.input[0] + "_last_position"
    consts = {"_bs_last_starts": [-1], "_bs_last_ends": [np.iinfo(np.int64).max], "_bs_last_axes": [1]}
    for cname, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), cname))
    slice_node = helper.make_node("Slice", [node.input[0], *consts], [sliced], name="bs_last_position")
    node.input[0] = sliced
    index = list(graph.node).index(node)
    graph.node.insert(index, slice_node)
    out_shape = graph.output[0].type.tensor_type.shape
    if len(out_shape.dim) == 3:
        out_shape.dim[1].Clear()
        out_shape.dim[1].dim_value = 1
    return model


#: bumped when the export changes what it computes, so cached files are made again
#: (2: Gemma 3 takes token_type_ids and attends bidirectionally within images)
EXPORT_REVISION = 2


def export_dense(family: str, hf_dir: Path, work_dir: Path, progress=None) -> Path:
    """``work_dir/dense-r<EXPORT_REVISION>.onnx``: the raw eager export, last-position logits. Made once."""
    from blindsight.models.export import export_language_model

    out = work_dir / f"dense-r{EXPORT_REVISION}.onnx"
    if out.is_file():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    raw = _atomic_target(work_dir / "raw.onnx")
    try:
        export_language_model(family, "eager", raw, config=str(hf_dir))
        model = onnx.load(str(raw))
        tmp = _atomic_target(out)
        onnx.save_model(last_position_logits(model), str(tmp))
        os.replace(tmp, out)
    finally:
        raw.unlink(missing_ok=True)
    return out


def profile_digest(profile: Profile) -> str:
    doc = {"layers": profile.layers, "sink_tokens": profile.sink_tokens}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def compile_with(dense: Path, profile: Profile, lowering: str = "fast", image_blocks: bool | None = None) -> Path:
    """``dense``'s folder / ``compiled-<lowering>-<profile digest>.onnx``, made once per profile.
    ``image_blocks``: None keeps the export's (Gemma 3: on); False compiles for the causal
    surrogate mask (file name ``...-causal.onnx``)."""
    from blindsight.compiler.pipeline import compile_model

    suffix = "-causal" if image_blocks is False else ""
    out = dense.with_name(f"compiled-{lowering}-{profile_digest(profile)}{suffix}.onnx")
    if not out.is_file():
        compile_model(dense, profile, out, lowering=lowering, image_blocks=image_blocks)
    return out


#: bs-eval's --weights: the compiled model as compiled, int8 (bs-quantize), int8 with the LM head too
WEIGHTS = ("fp32", "int8", "int8-lm-head")


def quantized(compiled: Path, lm_head: bool = False) -> Path:
    """``compiled`` with int8 weights (bs-quantize; ``lm_head``: its LM head too), beside it as
    ``<stem>.int8.onnx`` (``<stem>.int8-lm-head.onnx``), made once."""
    from blindsight.compiler.quantize import quantize_file

    out = compiled.with_name(f"{compiled.stem}.int8{'-lm-head' if lm_head else ''}.onnx")
    if not out.is_file():
        quantize_file(compiled, out, lm_head=lm_head)
    return out
