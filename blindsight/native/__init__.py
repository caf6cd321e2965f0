"""The native ``BlindSightAttention`` kernel for ONNX Runtime's CPU provider.

``python -m blindsight.native build`` compiles it (:mod:`blindsight.native.build`);
:func:`blindsight.runtime.session.make_session` registers it when it is built
(``native=None``: when built and every node is supported; ``True``: required;
``False``: never). ONNX Runtime then runs the kernel instead of each node's
model-local function, so the compiled graph is the same either way. Without the
library everything runs on the function bodies.

The kernel knows no category names. Each node carries ``key_clauses`` (INTS,
one per query head), the bit set of the key clauses of the head's row of the
rule table (:data:`blindsight.attention.semantics.CLAUSE_BITS`: any key, text
keys, the sinks of every image, the query's own image), which bs-compile
derives from ``categories``; the kernel reads them from the node itself and
builds each image query's key intervals from its bits (text queries see every
key). A new category made of known clauses thus needs nothing here; a new
clause needs its intervals in ``src/op.cc`` (and :func:`unsupported` keeps
models that use it on their function bodies until then). A node compiled
before ``key_clauses`` existed is refused by the kernel (:data:`STALE`): such a
model runs on its function bodies, or is recompiled.

The C++ code (``src/``) plans work as tiles of query rows that share their key
intervals (``attention.h``: no ONNX Runtime type in it), so a CUDA kernel can
take the same plan; only the CPU provider has one today.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from pathlib import Path

from blindsight.attention.schema import FORMATS, AttentionConfig, KeyClausesError, MissingKeyClauses, proto_configs
from blindsight.attention.semantics import CLAUSE_BITS, clause_names, key_clauses
from blindsight.native.build import API_VERSION, BUILD, HEADER_VERSION, LIBRARY_NAME

#: set to a path to load another build of the library
LIBRARY_ENV = "BLINDSIGHT_NATIVE_LIB"
#: the providers the native kernel runs on (a CUDA kernel would add "cuda")
PROVIDERS = ("cpu",)
DTYPES = ("float32", "float16")
NO_NODE = "no BlindSightAttention node"


def library_path() -> Path | None:
    """The built library, or None."""
    env = os.environ.get(LIBRARY_ENV)
    path = Path(env) if env else BUILD / LIBRARY_NAME
    return path if path.is_file() else None


def available() -> bool:
    return library_path() is not None


def isa() -> str | None:
    """The instruction set the library picked on this machine (baseline, avx2, avx512)."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.blindsight_native_isa.restype = ctypes.c_char_p
    return lib.blindsight_native_isa().decode()


def build_info() -> dict:
    try:
        return json.loads((BUILD / "build.json").read_text())
    except (OSError, ValueError):
        return {}


def describe() -> str:
    path = library_path()
    if path is None:
        return "native kernel: not built (python -m blindsight.native build); the function bodies run"
    info = build_info()
    return (f"native kernel: {path} ({isa()}; headers ONNX Runtime {info.get('header_version') or HEADER_VERSION}, "
            f"API {info.get('ort_api_version', API_VERSION)}: onnxruntime >= 1.{info.get('ort_api_version', API_VERSION)})")


def summary() -> str | None:
    """A short label of the built library for records: its name, instruction set and headers."""
    path = library_path()
    if path is None:
        return None
    info = build_info()
    return f"{path.name}, {isa()}, headers onnxruntime {info.get('header_version') or HEADER_VERSION} (API {info.get('ort_api_version', API_VERSION)})"


def kernel_clauses() -> dict[str, int]:
    """The key clauses the built library reads, by name, with their bits (empty when not built)."""
    path = library_path()
    if path is None:
        return {}
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "blindsight_native_clauses"):
        return {}  # a build from before key clauses: it reads none
    lib.blindsight_native_clauses.restype = ctypes.c_char_p
    pairs = (item.split("=") for item in lib.blindsight_native_clauses().decode().split(",") if item)
    return {name: int(bit) for name, bit in pairs}


def readable_bits() -> int:
    """The ``key_clauses`` bits that the built library reads as the rule table means them."""
    table = {c.name: bit for c, bit in CLAUSE_BITS.items()}
    bits = 0
    for name, bit in kernel_clauses().items():
        if table.get(name) == bit:
            bits |= bit
    return bits


def unsupported(cfg: AttentionConfig, provider: str = "cpu") -> str | None:
    """Why the native kernel cannot run this node (None: it can). The runtime then
    keeps the whole model on its function bodies."""
    if provider not in PROVIDERS:
        return f"the native kernel runs on the CPU provider only, not {provider!r}"
    if cfg.dtype not in DTYPES:
        return f"layer {cfg.layer}: {cfg.dtype} attention (the native kernel takes {', '.join(DTYPES)})"
    known = readable_bits()
    odd = sorted({c for c, bits in zip(cfg.categories, cfg.key_clauses) if bits & ~known})
    if odd:
        return (f"layer {cfg.layer}: the native kernel does not read every key clause of {', '.join(odd)} "
                f"({'; '.join(f'{c}: ' + ', '.join(clause_names(key_clauses(c))) for c in odd)})")
    if cfg.qkv_format not in FORMATS:
        return f"layer {cfg.layer}: qkv_format {cfg.qkv_format!r}"
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a session over a model will run its BlindSightAttention nodes with."""

    native: bool
    reason: str  # why not, or the library and instruction set

    @property
    def label(self) -> str:
        return f"native kernel ({self.reason})" if self.native else f"function bodies ({self.reason})"


#: the reason a model compiled before nodes carried ``key_clauses`` runs on its function bodies
STALE = "compiled before the kernel read key clauses: recompile with bs-compile to use the native kernel"


def plan(model, provider: str = "cpu") -> Plan:
    """Whether the native kernel can run every BlindSightAttention node of ``model``
    (an onnx ModelProto), and why not. Nodes whose ``key_clauses`` disagree with their
    categories raise :class:`~blindsight.attention.schema.KeyClausesError`."""
    path = library_path()
    if path is None:
        return Plan(False, "native kernel not built: python -m blindsight.native build")
    try:
        cfgs = proto_configs(model.graph, require_key_clauses=True)
    except MissingKeyClauses:
        return Plan(False, STALE)
    except KeyClausesError:
        raise
    except (ValueError, TypeError) as exc:
        return Plan(False, f"a BlindSightAttention node the native kernel cannot read: {exc}")
    if not cfgs:
        return Plan(False, NO_NODE)
    for cfg in cfgs:
        why = unsupported(cfg, provider)
        if why:
            return Plan(False, why)
    return Plan(True, f"{path.name}, {isa()}")


def register(opts) -> None:
    """Register the library with an onnxruntime SessionOptions."""
    path = library_path()
    if path is None:
        raise FileNotFoundError("native kernel not built: python -m blindsight.native build")
    opts.register_custom_ops_library(str(path))
