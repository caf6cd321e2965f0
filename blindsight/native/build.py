"""Build the native CPU kernel: ``python -m blindsight.native build``.

The headers come from Debian's ``libonnxruntime-dev`` (MIT), pinned by version
and sha256 (docs/specification.md §5): ONNX Runtime's C/C++ headers are on no Python index.
The package is fetched from the Debian mirror this machine's apt sources name
(or taken from ``--deb FILE`` / ``--headers DIR``), checked, and unpacked with
``dpkg-deb -x`` or, without dpkg, Python's own ar/tar reading. ``g++`` then
compiles ``src/`` into ``_build/libblindsight_ort.so`` inside this package
(gitignored): one baseline x86-64 object plus AVX2 and AVX-512 objects of the
same compute source, one of which the library picks at load time.

Why a build step of our own instead of scikit-build-core: the package stays a
pure-Python install (an editable install, the torch-free deployment venv and
its wheel need no compiler, no CMake and no download), and the kernel is an
optional accelerator that the function bodies stand in for; one g++ command
line per object needs no build system.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from blindsight.errors import BlindSightError

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
BUILD = HERE / "_build"
LIBRARY_NAME = "libblindsight_ort.so"

#: the pinned headers: Debian trixie's libonnxruntime-dev (ONNX Runtime 1.21.0, ORT_API_VERSION 21)
DEB_PACKAGE = "libonnxruntime-dev"
DEB_VERSION = "1.21.0+dfsg-1"
DEB_FILE = f"{DEB_PACKAGE}_{DEB_VERSION}_amd64.deb"
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
DEB_POOL = "pool/main/o/onnxruntime/"
HEADER_VERSION = "1.21.0"
API_VERSION = 21  # the oldest onnxruntime the library loads into is 1.21

ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def apt_mirrors(root: str = "/etc/apt") -> list[str]:
    """Debian archive base URLs named by apt's sources (one-line and deb822 formats),
    security archives last."""
    urls: list[str] = []
    files = [f"{root}/sources.list"] + sorted(glob.glob(f"{root}/sources.list.d/*.list")) + sorted(
        glob.glob(f"{root}/sources.list.d/*.sources"))
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line) or re.match(r"URIs:\s*(.+)", line)
            if m:
                urls += m.group(1).split()
    debian = [u.rstrip("/") for u in urls if re.search(r"/debian/?$", u)]
    return list(dict.fromkeys(debian)) or list(dict.fromkeys(u.rstrip("/") for u in urls if "debian" in u))


def fetch_deb(dest: Path, log) -> Path:
    mirrors = apt_mirrors()
    if not mirrors:
        raise BlindSightError("no Debian mirror in /etc/apt/sources.list(.d); pass --deb FILE or --headers DIR")
    errors = []
    for base in mirrors:
        url = f"{base}/{DEB_POOL}{DEB_FILE}"
        try:
            log(f"fetching {DEB_FILE} from the apt mirror {base}")
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except OSError as exc:
            errors.append(f"{base}: {exc}")
            continue
        path = dest / DEB_FILE
        path.write_bytes(data)
        return path
    raise BlindSightError(f"could not fetch {DEB_FILE} ({'; '.join(errors)}); pass --deb FILE or --headers DIR")


def verify(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise BlindSightError(f"{path.name}: sha256 {digest} is not the pinned {DEB_SHA256}")


def _ar_members(data: bytes):
    if not data.startswith(b"!<arch>\n"):
        raise BlindSightError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


def unpack(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    for name, blob in _ar_members(deb.read_bytes()):
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                    tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
            except tarfile.CompressionError:
                raise BlindSightError(f"{deb.name}: {name} needs dpkg-deb to unpack") from None
            return
    raise BlindSightError(f"{deb.name} has no data archive")


def headers(deb: str | None, log) -> Path:
    """The include directory holding onnxruntime_c_api.h (fetched once into _build/)."""
    inc = BUILD / "include" / "onnxruntime"
    if (inc / "onnxruntime_c_api.h").exists():
        return inc
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(deb) if deb else fetch_deb(tmp, log)
        if not path.exists():
            raise BlindSightError(f"{path}: no such file")
        verify(path)
        unpack(path, tmp / "x")
        found = tmp / "x" / "usr" / "include" / "onnxruntime"
        if not (found / "onnxruntime_c_api.h").exists():
            raise BlindSightError(f"{path.name} holds no onnxruntime_c_api.h")
        inc.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(inc, ignore_errors=True)
        shutil.copytree(found, inc)
    return inc


def api_version(include: Path) -> int:
    m = re.search(r"#define ORT_API_VERSION (\d+)", (include / "onnxruntime_c_api.h").read_text())
    if not m:
        raise BlindSightError(f"{include}: no ORT_API_VERSION in onnxruntime_c_api.h")
    return int(m.group(1))


def build(deb: str | None = None, header_dir: str | None = None, cxx: str | None = None, quiet: bool = False) -> Path:
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    cxx = cxx or os.environ.get("CXX") or "g++"
    if not shutil.which(cxx):
        raise BlindSightError(f"no C++ compiler {cxx!r} on PATH (install g++, or set CXX)")
    include = Path(header_dir) if header_dir else headers(deb, log)
    if not (include / "onnxruntime_c_api.h").exists():
        raise BlindSightError(f"{include}: no onnxruntime_c_api.h")
    api = api_version(include)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isas = list(ISA_FLAGS) if x86 else ["baseline"]
    BUILD.mkdir(parents=True, exist_ok=True)
    common = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", f"-I{SRC}", f"-I{include}"]
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        objs = []
        for isa in isas:
            obj = Path(tmp) / f"kernel_{isa}.o"
            _run([cxx, *common, *ISA_FLAGS[isa], f"-DBS_NS=bs_{isa}", "-c", str(SRC / "kernel.cc"), "-o", str(obj)], log)
            objs.append(obj)
        op_obj = Path(tmp) / "op.o"
        _run([cxx, *common, "-c", str(SRC / "op.cc"), "-o", str(op_obj)], log)
        out_tmp = Path(tmp) / LIBRARY_NAME
        _run([cxx, "-shared", "-o", str(out_tmp), str(op_obj), *map(str, objs), "-pthread"], log)
        out = BUILD / LIBRARY_NAME
        os.replace(out_tmp, out)
    info = {"library": LIBRARY_NAME, "headers": f"{DEB_PACKAGE} {DEB_VERSION}" if not header_dir else str(include),
            "header_version": HEADER_VERSION if not header_dir else None, "ort_api_version": api,
            "oldest_onnxruntime": f"1.{api}", "isas": isas, "compiler": _version(cxx)}
    (BUILD / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"built {out} (headers ORT_API_VERSION {api}: loads into onnxruntime >= 1.{api}; objects: {', '.join(isas)})")
    return out


def _run(cmd, log) -> None:
    log(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BlindSightError(f"compiling failed ({cmd[0]} exit {r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return cxx
