"""bs-quantize as functions: int8 weights for one graph, or for a whole bs-export directory.

An option that trades accuracy for speed, never a default: docs/quantization.md
gives its measured effect. The graphs keep their inputs and outputs, so a
quantized export runs, compiles and serves like the one it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from blindsight.compiler.genai import check_output_folder
from blindsight.compiler.genai_vlm import TEMPLATE
from blindsight.compiler.pipeline import _has_external_data, external_data_files, load_model
from blindsight.errors import ModelError
from blindsight.passes.quantize import float32_matmul_weights, quantize_matmul_weights
from blindsight.staging import staged_dir

SCHEME = "int8-dynamic"
#: the export's graphs that are quantized; the embedding is a table lookup (Gather), left as it is
QUANTIZED_GRAPHS = ("vision", "language_model")


@dataclasses.dataclass
class QuantizeResult:
    output: Path
    graphs: dict[str, int]  # graph file -> MatMuls made int8
    left_out: list[str] = dataclasses.field(default_factory=list)
    lm_head: bool = False  # the LM head made int8 too

    def summary(self) -> str:
        made = ", ".join(f"{name}: {n} MatMuls" for name, n in self.graphs.items())
        head = "LM head int8" if self.lm_head else "LM head float32"
        lines = [f"int8 weights ({SCHEME}; {made}; {head}) -> {self.output}"]
        if self.left_out:
            lines.append(f"not copied (graphs on the float32 weights; compile the quantized language model again): "
                         f"{', '.join(self.left_out)}")
        return "\n".join(lines)


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".int8.onnx")


def _quantized(path: Path, lm_head: bool = False) -> tuple[ir.Model, int, bool]:
    """(quantized model, MatMuls made int8, whether the source kept its weights in external data)."""
    model = load_model(path)
    external = _has_external_data(model)
    _read_hard_links(model, path.parent)
    try:
        count = quantize_matmul_weights(model, lm_head=lm_head)
    except ValueError as exc:
        if "symbolic link" not in str(exc) and "outside the base directory" not in str(exc):
            raise
        raise ModelError(f"{path}'s external data lies outside its folder (a symbolic link or a ../ location), "
                         f"which onnx-ir refuses to read; copy the data into the folder (cp, not ln)") from None
    if count == 0:
        f32, other = float32_matmul_weights(model)
        why = (f"its {other} MatMul weights are not float32: quantize the fp32 export (bs-export --dtype fp32)"
               if other else "it has no MatMul with a constant weight matrix that is not the LM head")
        raise ModelError(f"nothing to quantize in {path}: {why}")
    return model, count, external


def _read_hard_links(model: ir.Model, folder: Path) -> None:
    """Let the weight files inside the model's folder be read when they have other hard links.

    onnx-ir refuses external data with more than one hard link (a guard against a
    sensitive file linked into a model's folder). bs-compile --genai hard-links an
    export's weight files into the genai folders it writes, so those files have two,
    and the export could not be quantized after it. Such a file is read when its
    resolved path lies inside ``folder``; data reached through a symbolic link out of
    the folder stays refused by onnx-ir's own check."""
    root = folder.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        real = Path(os.path.realpath(tensor.path))
        try:
            linked = os.stat(real).st_nlink > 1
        except OSError:
            continue
        if linked and root in real.parents:
            # no base_dir: onnx-ir's path checks (done here above) are off for this one file
            value.const_value = ir.ExternalTensor(str(real), tensor.offset, tensor.length, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name)


def _write(model: ir.Model, output: Path, external: bool) -> None:
    """Write ``output`` (and ``output``.data when ``external``) whole or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    data = output.name + ".data"
    try:
        ir.save(model, stage / output.name, external_data=data if external else None)
        if external:
            os.replace(stage / data, output.with_name(data))
        os.replace(stage / output.name, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def quantize_file(model_path, output=None, lm_head: bool = False) -> QuantizeResult:
    """int8 weights for one ONNX graph (a language model, compiled or not, or a vision tower)."""
    model_path = Path(model_path)
    output = Path(output) if output is not None else default_output(model_path)
    if output.resolve() == model_path.resolve():
        raise ModelError(f"output path {output} is the input model; choose another with -o")
    if output.suffix != ".onnx":
        raise ModelError(f"output path {output} does not end in .onnx; name the quantized model NAME.onnx")
    model, count, external = _quantized(model_path, lm_head)
    _write(model, output, external)
    return QuantizeResult(output, {model_path.name: count}, lm_head=lm_head)


def _data_files(graph: Path) -> set[str]:
    return external_data_files(onnx.load(str(graph), load_external_data=False))


def quantize_export(export_dir, out_dir, overwrite: bool = False, lm_head: bool = False) -> QuantizeResult:
    """A new bs-export directory ``out_dir`` with int8 weights in its vision tower and language
    model; every other file is copied. Other graphs in the source (compiled language models)
    are left out: they read the float32 weights."""
    src, out = Path(export_dir), Path(out_dir)
    template_path = src / TEMPLATE
    try:
        template = json.loads(template_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ModelError(f"{src} is not a bs-export directory (no readable {TEMPLATE}); run bs-export first") from None
    if template.get("quantized"):
        raise ModelError(f"{src} is already quantized ({template['quantized'].get('scheme')}); quantize the float32 export")
    check_output_folder(src, out, overwrite, "the export")
    files = template["files"]
    graphs = {files[g] for g in QUANTIZED_GRAPHS}
    for name in sorted(graphs):
        if not (src / name).is_file():
            raise ModelError(f"{src / name} is missing from the export directory; run bs-export again")
    replaced = graphs | {d for g in graphs for d in _data_files(src / g)}
    kept_graphs = {n for n in files.values() if n not in graphs}
    kept = kept_graphs | {d for g in kept_graphs if (src / g).is_file() for d in _data_files(src / g)}
    left_out = sorted(p.name for p in src.iterdir() if p.suffix == ".onnx" and p.name not in graphs | kept)
    counts: dict[str, int] = {}
    with staged_dir(out) as tmp:
        for name in sorted(graphs):
            model, counts[name], external = _quantized(src / name, lm_head and name == files["language_model"])
            _write(model, tmp / name, external)
            del model
        for path in sorted(src.iterdir()):
            if not path.is_file() or path.name in replaced or path.name == TEMPLATE:
                continue
            if path.suffix == ".onnx" and path.name not in kept:
                continue
            if path.name.endswith(".data") and path.name not in kept:
                continue
            shutil.copyfile(path, tmp / path.name)
        template["quantized"] = {"scheme": SCHEME, "graphs": dict(sorted(counts.items())),
                                 "lm_head": "int8" if lm_head else "float32 (a MatMul whose result is a graph output is kept)"}
        (tmp / TEMPLATE).write_text(json.dumps(template, indent=1) + "\n")
    return QuantizeResult(out, counts, left_out, lm_head=lm_head)
