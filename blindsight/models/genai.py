"""Decoders as onnxruntime-genai's model builder writes them, made offline.

The builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging
Face checkpoint folder into ``model.onnx`` + ``genai_config.json``: the text
decoder with ``com.microsoft.GroupQueryAttention`` (past/present KV cache
sharing one buffer), the tokenizer files and the chat template. It needs
onnxruntime-genai's own onnxruntime (a newer one than this project pins), so it
runs in a separate Python environment, called here through a subprocess.

``make_tiny_decoder(family, out_dir, python=...)`` writes a tiny random
checkpoint with :mod:`blindsight.models.checkpoints` (in this environment) and
runs the builder on it (in ``python``'s environment). ``GENAI_REQUIREMENTS``
is what that environment needs; ``create_venv`` installs it.

Command line: ``python -m blindsight.models.genai OUT --python VENV/bin/python
[--family qwen2_5_vl] [--context-length 256]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from blindsight.errors import ModelError

#: what the builder's environment needs (torch pinned: the CPU wheel; transformers as this project's)
GENAI_REQUIREMENTS = ("onnxruntime-genai==0.18.0", "onnx_ir", "torch==2.13.0", "transformers==5.23.0")


def create_venv(path, requirements=GENAI_REQUIREMENTS) -> Path:
    """Create a virtual environment at ``path`` with the builder's requirements; returns its python."""
    path = Path(path)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    return python


def builder_versions(python) -> dict[str, str]:
    """The versions of the packages that make the builder's output, read in ``python``'s environment."""
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('onnxruntime-genai', 'onnxruntime', 'onnx', 'onnx_ir', 'torch', 'transformers')}))")
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def builder_command(python, checkpoint, out_dir, *, precision="fp32", provider="cpu", cache_dir=None,
                    extra_options: dict | None = None) -> list[str]:
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out_dir),
           "-p", precision, "-e", provider]
    if cache_dir is not None:
        cmd += ["-c", str(cache_dir)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    return cmd


def build_decoder(python, checkpoint, out_dir, **kwargs) -> Path:
    """Run the builder in ``python``'s environment; returns ``out_dir`` (holding model.onnx)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        kwargs.setdefault("cache_dir", cache)
        cmd = builder_command(python, checkpoint, out_dir, **kwargs)
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out_dir / "model.onnx").is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise ModelError(f"onnxruntime-genai's builder failed ({' '.join(cmd)}):\n{tail}")
    return out_dir


def shrink_context(checkpoint, context_length: int) -> None:
    """Lower the checkpoint's ``max_position_embeddings`` (the builder sizes its
    cos/sin caches and genai's context from it)."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = context_length
    path.write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_decoder(family: str, out_dir, *, python, seed: int = 0, num_layers: int = 2, num_kv_heads: int = 2,
                      context_length: int | None = 256) -> Path:
    """A tiny random checkpoint of ``family`` through the builder: ``out_dir`` gets
    model.onnx, model.onnx.data, genai_config.json and the tokenizer files."""
    from blindsight.models.checkpoints import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="genai-ckpt-") as tmp:
        ckpt = make_tiny_checkpoint(family, Path(tmp) / "ckpt", seed=seed, num_layers=num_layers,
                                    num_kv_heads=num_kv_heads)
        if context_length:
            shrink_context(ckpt, context_length)
        return build_decoder(python, ckpt, out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blindsight.models.genai", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (model.onnx, genai_config.json, tokenizer)")
    ap.add_argument("--python", required=True, help="python of an environment with onnxruntime-genai (see create_venv)")
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context-length", type=int, default=256)
    args = ap.parse_args(argv)
    out = make_tiny_decoder(args.family, args.out, python=args.python, seed=args.seed, num_layers=args.layers,
                            num_kv_heads=args.kv_heads, context_length=args.context_length)
    print(f"wrote {out / 'model.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
