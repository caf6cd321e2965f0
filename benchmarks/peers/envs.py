"""Each peer engine's Python environment: a venv made on first use with pinned versions.

The project runs in the driver's own interpreter. A peer gets a venv of its own
because its conversion tool pins versions that clash with the project's
(optimum-intel's Qwen2-VL export refuses transformers > 5.0, the project uses 5.23).
The venv's folder name carries a hash of its pins, so changing a pin makes a new one.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers.errors import PeersError

#: torch is pinned to the CPU build on this machine's index: any other version
#: resolves to a CUDA build and gigabytes of CUDA packages. torchvision stays out:
#: its PyPI wheel is a CUDA build that fails to load next to CPU torch
#: ("operator torchvision::nms does not exist"), and optimum-intel requires it, so
#: optimum-intel goes in without dependencies (NO_DEPS) and its other requirements
#: are listed here; the conversion saves the image processor without torchvision.
OPENVINO_PINS = (
    "torch==2.13.0",
    "openvino==2026.4.1",
    "openvino-genai==2026.4.1.0",
    "openvino-tokenizers==2026.4.1.0",
    "transformers==5.0.0",
    "optimum==2.3.0",
    "nncf==3.4.0",
    "huggingface-hub>=0.23.2,<1.22",
    "requests>=2.33,<3",
    "setuptools",
    "Pillow>=9.1",
    "numpy",
)
OPENVINO_NO_DEPS = ("optimum-intel==2.2.0",)

#: the packages whose versions go into the record
OPENVINO_REPORTED = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "optimum",
                     "transformers", "torch", "numpy")

#: llama-cpp-python builds llama.cpp from its sdist (tens of minutes on 2 cores): the
#: wheel is built once into the venvs folder and every later venv installs it from
#: there. The sdist also carries the converter (convert_hf_to_gguf.py with its
#: conversion package and gguf-py), which no wheel installs; its requirements
#: (transformers 4.57.6, sentencepiece, protobuf < 5) are pinned beside it.
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_PINS = (
    f"llama-cpp-python=={LLAMACPP_VERSION}",
    "torch==2.13.0",
    "transformers==4.57.6",
    "numpy==2.2.6",
    "sentencepiece==0.2.3",
    "protobuf==4.25.9",
    "pyyaml",
    "tqdm",
    "requests",
    "Pillow>=9.1",
)
LLAMACPP_REPORTED = ("llama-cpp-python", "transformers", "torch", "numpy", "sentencepiece")
#: where the converter is unpacked inside the llama.cpp venv
CONVERTER = "llama.cpp"

#: onnxruntime-genai runs its worker and its model builder, which loads the checkpoint
#: with transformers and torch and writes the graph with onnx-ir; genai 0.18.0 asks for
#: onnxruntime >= 1.31
GENAI_VERSION = "0.18.0"
GENAI_PINS = (
    f"onnxruntime-genai=={GENAI_VERSION}",
    "onnxruntime==1.32.0",
    "torch==2.13.0",
    "transformers==5.23.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "numpy",
    "tqdm",
)
GENAI_REPORTED = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy")

PINS = {"openvino": OPENVINO_PINS, "llamacpp": LLAMACPP_PINS, "genai": GENAI_PINS}
NO_DEPS = {"openvino": OPENVINO_NO_DEPS, "llamacpp": (), "genai": ()}
REPORTED = {"openvino": OPENVINO_REPORTED, "llamacpp": LLAMACPP_REPORTED, "genai": GENAI_REPORTED,
            "project": ("blindsight-ort", "onnxruntime", "onnx", "numpy", "transformers", "torch")}
READY = "peers-ready.json"


def venv_path(root: Path, engine: str) -> Path:
    digest = hashlib.sha256("\n".join(PINS[engine] + NO_DEPS[engine]).encode()).hexdigest()[:10]
    return Path(root) / f"{engine}-{digest}"


def python_of(engine: str, root: Path, log=print, given: Path | None = None) -> tuple[Path, float | None]:
    """The interpreter that runs ``engine``'s worker and tools, and the seconds it took to
    make its venv (None: it was there already, or ``given`` names the interpreter to use);
    the venv is made if missing."""
    if engine == "project":
        return Path(sys.executable), None
    if given is not None:
        return Path(given), None
    venv = venv_path(root, engine)
    seconds = None
    if not (venv / READY).is_file():
        seconds = create(engine, venv, log)
    return venv / "bin" / "python", seconds


def create(engine: str, venv: Path, log=print) -> float:
    """Make the venv and install the pins; a marker written last means a broken
    half-made venv (interrupted install) is rebuilt next time, not used."""
    t0 = time.perf_counter()
    log(f"creating the {engine} venv at {venv} (once, a few minutes: pip installs torch, {engine} and its exporter)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], f"creating the venv {venv}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run(pip + ["--upgrade", "pip"], "upgrading pip in the venv")
    extra = []
    if engine == "llamacpp":
        wheels = llamacpp_sources(venv.parent, log)
        extra = ["--find-links", str(wheels)]
    _run(pip + extra + list(PINS[engine]), f"installing {' '.join(PINS[engine])} into {venv}")
    if NO_DEPS[engine]:
        _run(pip + ["--no-deps", *NO_DEPS[engine]], f"installing {' '.join(NO_DEPS[engine])} into {venv}")
    if engine == "llamacpp":
        unpack_converter(venv.parent / "wheels", venv / CONVERTER)
    broken = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torchvision') is not None)"],
                            capture_output=True, text=True).stdout.strip()
    if broken != "False":
        raise PeersError(f"torchvision got into {venv}; its CUDA wheel breaks CPU torch: remove it from the pins")
    seconds = time.perf_counter() - t0
    (venv / READY).write_text(json.dumps({"pins": list(PINS[engine] + NO_DEPS[engine]), "seconds": round(seconds, 1)}) + "\n")
    log(f"{engine} venv ready in {seconds:.0f} s")
    return seconds


def llamacpp_sources(root: Path, log=print) -> Path:
    """``root/wheels`` with llama-cpp-python's sdist and the wheel built from it (once)."""
    wheels = Path(root) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    sdist = wheels / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMACPP_VERSION}", "-d", str(wheels)], "downloading the llama-cpp-python sdist")
    if not list(wheels.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl")):
        log(f"building llama-cpp-python {LLAMACPP_VERSION} (once; tens of minutes on 2 cores)")
        # by name, not from the sdist file: pip's own wheel cache then answers if it built this release before
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", f"llama-cpp-python=={LLAMACPP_VERSION}",
              "-w", str(wheels)], "building the llama-cpp-python wheel")
    return wheels


def unpack_converter(wheels: Path, dest: Path) -> Path:
    """convert_hf_to_gguf.py, its conversion package and gguf-py from the sdist into ``dest``."""
    import tarfile

    sdist = Path(wheels) / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    prefix = f"llama_cpp_python-{LLAMACPP_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise PeersError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(dest, members=members, filter="data")
    return dest / "convert_hf_to_gguf.py"


def _run(cmd: list[str], what: str):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PeersError(f"{what} failed: {tail[0]}")


VERSIONS_SCRIPT = """
import json, sys
from importlib import metadata
out = {"python": sys.version.split()[0]}
for name in sys.argv[1:]:
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def versions(engine: str, python: Path) -> dict:
    """Installed versions of the engine's packages, read by the interpreter that runs it."""
    proc = subprocess.run([str(python), "-c", VERSIONS_SCRIPT, *REPORTED[engine]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeersError(f"reading the {engine} versions with {python} failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)
