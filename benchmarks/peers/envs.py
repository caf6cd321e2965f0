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

PINS = {"openvino": OPENVINO_PINS}
NO_DEPS = {"openvino": OPENVINO_NO_DEPS}
REPORTED = {"openvino": OPENVINO_REPORTED,
            "project": ("blindsight-ort", "onnxruntime", "onnx", "numpy", "transformers", "torch")}
READY = "peers-ready.json"


def venv_path(root: Path, engine: str) -> Path:
    digest = hashlib.sha256("\n".join(PINS[engine] + NO_DEPS[engine]).encode()).hexdigest()[:10]
    return Path(root) / f"{engine}-{digest}"


def python_of(engine: str, root: Path, log=print) -> tuple[Path, float | None]:
    """The interpreter that runs ``engine``'s worker and tools, and the seconds it took to
    make its venv (None: it was there already); the venv is made if missing."""
    if engine == "project":
        return Path(sys.executable), None
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
    _run(pip + list(PINS[engine]), f"installing {' '.join(PINS[engine])} into {venv}")
    _run(pip + ["--no-deps", *NO_DEPS[engine]], f"installing {' '.join(NO_DEPS[engine])} into {venv}")
    broken = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torchvision') is not None)"],
                            capture_output=True, text=True).stdout.strip()
    if broken != "False":
        raise PeersError(f"torchvision got into {venv}; its CUDA wheel breaks CPU torch: remove it from the pins")
    seconds = time.perf_counter() - t0
    (venv / READY).write_text(json.dumps({"pins": list(PINS[engine] + NO_DEPS[engine]), "seconds": round(seconds, 1)}) + "\n")
    log(f"{engine} venv ready in {seconds:.0f} s")
    return seconds


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
