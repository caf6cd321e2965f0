"""bs-compile on an onnxruntime-genai model folder.

onnxruntime-genai's model builder writes a folder: ``genai_config.json`` (its
``model.decoder.filename`` names the decoder graph), the decoder
(``com.microsoft.GroupQueryAttention`` with a KV cache), its weights, the
tokenizer files. :func:`compile_genai_folder` writes a new folder that genai
loads the same way: every file of the source (weights hard-linked where the
file system allows, else copied), the compiled decoder beside the source
decoder (so the external-data references stay valid), and genai_config.json
naming the compiled graph and, when the native kernel is built, a copy of the
kernel's library in the folder as the decoder session's ``custom_ops_library``
(genai loads such a library only from inside the model folder, measured with
onnxruntime-genai 0.18.0; named relative to it, the folder stays movable). The source folder is never
written; the output is assembled beside its final place and renamed into it.

The compiled decoder keeps genai's inputs and outputs and gains
``image_spans``; feed it with ``Generator.set_model_input`` before the first
``append_tokens`` (:mod:`blindsight.runtime.genai`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from blindsight.compiler.pipeline import CompileResult, compile_model
from blindsight.errors import ModelError
from blindsight.staging import staged_dir

GENAI_CONFIG = "genai_config.json"


def is_genai_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


@dataclasses.dataclass
class GenaiCompileResult:
    out_dir: Path
    decoder: CompileResult
    custom_ops_library: str | None

    def summary(self) -> str:
        kernel = (f"native kernel {self.custom_ops_library} copied in as custom_ops_library" if self.custom_ops_library
                  else "function bodies (no custom_ops_library)")
        return f"{self.decoder.summary()}; genai folder {self.out_dir} ({GENAI_CONFIG} names it; {kernel})"


def read_genai_config(folder: Path) -> dict:
    path = folder / GENAI_CONFIG
    try:
        config = json.loads(path.read_text())
        decoder = config["model"]["decoder"]
        decoder["filename"]
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); pass a folder written by onnxruntime-genai's model builder") from None
    except (KeyError, TypeError):
        raise ModelError(f"{path} has no model.decoder.filename; pass a folder written by onnxruntime-genai's model builder") from None
    if not (folder / decoder["filename"]).is_file():
        raise ModelError(f"{path} names the decoder {decoder['filename']!r}, which is not in {folder}")
    return config


def check_output_folder(source: Path, out_dir: Path, overwrite: bool, what: str) -> None:
    """A new folder ``out_dir`` written from ``source`` (``what`` names it in the message):
    never the source or inside it, and a non-empty one only with ``overwrite``."""
    if out_dir.resolve() == source.resolve() or source.resolve() in out_dir.resolve().parents:
        raise ModelError(f"the output folder {out_dir} is {what} or inside it; choose another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"{out_dir} exists and is not a folder; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"{out_dir} exists and is not empty; pass --overwrite to replace it, or choose another -o")


def native_library(native: bool | None) -> Path | None:
    """The native kernel's library to name as custom_ops_library: when built (``native`` None),
    required (True: an error when it is not built) or never (False)."""
    from blindsight import native as native_kernel

    library = native_kernel.library_path() if native is not False else None
    if native is True and library is None:
        raise ModelError("native kernel not built: python -m blindsight.native build (or leave it out)")
    return library


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def compile_genai_folder(folder, profile, out_dir, lowering: str = "fast", native: bool | None = None,
                         overwrite: bool = False) -> GenaiCompileResult:
    """Compile ``folder``'s decoder with ``profile`` into a new genai folder ``out_dir``
    (an existing non-empty one only with ``overwrite``: it is replaced whole).
    ``native``: name the native kernel in genai_config.json when it is built (None),
    always (True: an error when it is not built) or never (False)."""
    folder, out_dir = Path(folder), Path(out_dir)
    if not is_genai_folder(folder):
        raise ModelError(f"{folder} is not an onnxruntime-genai folder (no {GENAI_CONFIG})")
    config = read_genai_config(folder)
    check_output_folder(folder, out_dir, overwrite, "the source folder")
    library = native_library(native)
    decoder = config["model"]["decoder"]
    source = decoder["filename"]
    compiled_name = Path(source).stem + ".blindsight.onnx"
    with staged_dir(out_dir) as tmp:
        for item in sorted(folder.iterdir()):
            if item.name != compiled_name:
                _link_or_copy(item, tmp / item.name)
        result = compile_model(tmp / source, profile, tmp / compiled_name, lowering)
        decoder["filename"] = compiled_name
        if library is not None:
            shutil.copy2(library, tmp / library.name)
            decoder.setdefault("session_options", {})["custom_ops_library"] = library.name
        else:
            decoder.get("session_options", {}).pop("custom_ops_library", None)
        (tmp / GENAI_CONFIG).unlink()  # a hard link would write through into the source folder
        (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    result.output = out_dir / compiled_name
    return GenaiCompileResult(out_dir, result, library.name if library is not None else None)
