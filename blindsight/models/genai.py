"""Decoders as onnxruntime-genai's model builder writes them, made offline.

The builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging
Face checkpoint folder into ``model.onnx`` + ``genai_config.json``: the text
decoder with ``com.microsoft.GroupQueryAttention`` (past/present KV cache
sharing one buffer), the tokenizer files and the chat template. It runs in a
child process, in this environment when the ``genai`` and ``export`` extras are
installed (onnxruntime-genai 0.18.0 runs on this project's onnxruntime 1.31,
measured), or in a separate one.

``make_tiny_decoder(family, out_dir, python=...)`` writes a tiny random
checkpoint with :mod:`blindsight.models.checkpoints` (in this environment) and
runs the builder on it (in ``python``'s environment). ``GENAI_REQUIREMENTS``
is what a separate environment needs; ``create_venv`` installs it.

``bs-compile FOLDER --profile p.json -o OUT`` compiles such a folder
(:mod:`blindsight.compiler.genai`); :mod:`blindsight.runtime.genai` runs one in
onnxruntime-genai and in this environment's onnxruntime, and its command line
(``python -m blindsight.runtime.genai OUT [--python PYTHON] [--greedy]``)
builds a tiny decoder with this module.
"""

from __future__ import annotations

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


def flatten_rope(checkpoint) -> None:
    """Gemma 3 under transformers 5 nests ``rope_parameters`` per layer type; the
    builder (0.18.0) reads ``rope_parameters["rope_type"]`` and
    ``config.rope_local_base_freq`` (KeyError 'rope_type' otherwise). Give it the
    full-attention layers' parameters flat and the sliding layers' theta apart."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:
        text["rope_parameters"] = dict(rope["full_attention"])
        local = rope.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            text["rope_local_base_freq"] = config["rope_local_base_freq"] = local
    path.write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_decoder(family: str, out_dir, *, python, seed: int = 0, num_layers: int = 2, num_kv_heads: int = 2,
                      context_length: int | None = 256, extra_options: dict | None = None, precision: str = "fp32") -> Path:
    """A tiny random checkpoint of ``family`` (a :mod:`blindsight.families` name, or
    ``qwen3_vl``: :func:`~blindsight.models.checkpoints.make_tiny_qwen3_vl_checkpoint`)
    through the builder: ``out_dir`` gets model.onnx, model.onnx.data,
    genai_config.json and the tokenizer files.
    ``extra_options``: the builder's (e.g. ``{"windowed_kv_cache": "false"}``:
    sliding layers keep full-length caches rather than window-sized ones); ``precision``: the
    builder's ``-p`` (fp32, int4: ``MatMulNBits`` weights)."""
    from blindsight.models.checkpoints import make_tiny_checkpoint, make_tiny_qwen3_vl_checkpoint

    with tempfile.TemporaryDirectory(prefix="genai-ckpt-") as tmp:
        if family == "qwen3_vl":
            ckpt = make_tiny_qwen3_vl_checkpoint(Path(tmp) / "ckpt", seed=seed, num_layers=num_layers,
                                                 num_kv_heads=num_kv_heads)
        else:
            ckpt = make_tiny_checkpoint(family, Path(tmp) / "ckpt", seed=seed, num_layers=num_layers,
                                        num_kv_heads=num_kv_heads)
        if context_length:
            shrink_context(ckpt, context_length)
        flatten_rope(ckpt)
        return build_decoder(python, ckpt, out_dir, extra_options=extra_options, precision=precision)
