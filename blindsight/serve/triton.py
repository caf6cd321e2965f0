"""bs-serve-triton: a Triton Inference Server model repository for a bs-export directory.

Writes, for Triton's ``onnxruntime`` backend::

    REPO/
      <name>_language_model/config.pbtxt   the compiled language model: inputs_embeds, position_ids,
                                           attention_mask, the KV cache, image_spans (int64 [N, 2]),
                                           token_type_ids for Gemma 3; logits and present.* out
      <name>_language_model/1/language_model.blindsight.onnx (+ its external data files, if any)
      <name>_embed/config.pbtxt, <name>_embed/1/embed.onnx        token embeddings
      <name>_vision/config.pbtxt, <name>_vision/1/vision.onnx     the vision encoder

Every input and output of a config is read off the ONNX graph (names, element
types, dims; a symbolic dim is -1), ``max_batch_size: 0`` (the graphs carry
their own batch dim, and ``image_spans`` is shared by all batch rows), and
``default_model_filename`` keeps each file's own name so external-data
references stay valid. The BlindSightAttention nodes are model-local functions
of stock ONNX operators, so the backend's ONNX Runtime runs them with no custom
library (it must be a version that takes the graph's opset and IR version).
The client does what :class:`~blindsight.runtime.pipeline.Pipeline` does around
the three models: prompt, image features merged into the embeddings, position
ids, spans, greedy decoding with the cache.

Not run here: the ``tritonserver`` package on the registry this project uses is
a placeholder (its install fails and points to NVIDIA's containers), so no
Triton server has loaded these repositories on this project's machines. The
repository's model files are checked by running them in ONNX Runtime with the
config's inputs (tests/test_serve.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from blindsight.errors import BlindSightError

TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
                9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


def tensor_specs(values) -> list[dict]:
    """[{"name", "data_type", "dims"}] of ONNX graph inputs or outputs."""
    specs = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in TRITON_TYPES:
            raise BlindSightError(f"{v.name}: ONNX element type {t.elem_type} has no Triton data type here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        specs.append({"name": v.name, "data_type": TRITON_TYPES[t.elem_type], "dims": dims})
    return specs


def _block(kind: str, specs: list[dict]) -> str:
    items = []
    for s in specs:
        dims = ", ".join(str(d) for d in s["dims"]) if s["dims"] else ""
        # a scalar has no dims in ONNX; Triton takes [1] with reshape to []
        shape = f"dims: [ {dims} ]" if s["dims"] else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        items.append(f'  {{\n    name: "{s["name"]}"\n    data_type: {s["data_type"]}\n    {shape}\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def config_pbtxt(name: str, model_file: str, inputs: list[dict], outputs: list[dict], kind: str = "cpu",
                 instances: int = 1) -> str:
    """A Triton config.pbtxt (protobuf text format) for one ONNX Runtime model."""
    group = "KIND_GPU" if kind == "gpu" else "KIND_CPU"
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
            f'default_model_filename: "{model_file}"\n'
            + _block("input", inputs) + _block("output", outputs)
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: {group}\n  }}\n]\n")


def _external_files(model) -> list[str]:
    files = set()
    for init in model.graph.initializer:
        if init.data_location == 1:  # EXTERNAL
            files.update(e.value for e in init.external_data if e.key == "location")
    return sorted(files)


def write_model(repo: Path, name: str, path: Path, kind: str, instances: int) -> dict:
    import onnx

    if not path.is_file():
        raise BlindSightError(f"{path} does not exist; run bs-export (and bs-compile for the language model) first")
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = tensor_specs(model.graph.input), tensor_specs(model.graph.output)
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, version / path.name)
    for rel in _external_files(model):
        (version / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.parent / rel, version / rel)
    (repo / name / "config.pbtxt").write_text(config_pbtxt(name, path.name, inputs, outputs, kind, instances))
    return {"name": name, "file": str(version / path.name), "inputs": inputs, "outputs": outputs}


def write_repository(out_dir, repo, name: str | None = None, model="compiled", kind: str = "cpu",
                     instances: int = 1) -> list[dict]:
    """The model repository for ``out_dir``; returns what each config holds."""
    from blindsight.attention.schema import SPANS_INPUT
    from blindsight.runtime.pipeline import load_template, resolve_model

    out_dir, repo = Path(out_dir), Path(repo)
    template = load_template(out_dir)
    lm = resolve_model(out_dir, template, model)
    prefix = name or out_dir.resolve().name
    prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in prefix)
    written = [write_model(repo, f"{prefix}_language_model", lm, kind, instances)]
    if model in ("compiled", True) and SPANS_INPUT not in {s["name"] for s in written[0]["inputs"]}:
        raise BlindSightError(f"{lm} has no {SPANS_INPUT!r} input: it is not a compiled BlindSight model")
    for part in ("embed", "vision"):
        written.append(write_model(repo, f"{prefix}_{part}", out_dir / template["files"][part], kind, instances))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bs-serve-triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by bs-export (with a compiled model)")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="the model repository to write")
    p.add_argument("--name", default=None, help="model-name prefix (default: OUT_DIR's name)")
    p.add_argument("--model", default="compiled", metavar="compiled|dense|PATH", help="the language model (default compiled)")
    p.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="instance_group kind (default cpu)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances of each model (default 1)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.instances < 1:
        raise BlindSightError(f"--instances is {args.instances}; give 1 or more")
    written = write_repository(args.out_dir, args.output, args.name, args.model, args.kind, args.instances)
    if args.json:
        print(json.dumps(written))
    else:
        for w in written:
            print(f"{w['name']}: {len(w['inputs'])} inputs, {len(w['outputs'])} outputs -> {w['file']}")
        print(f"tritonserver --model-repository {Path(args.output).resolve()}  (not run here: see bs-serve-triton --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
