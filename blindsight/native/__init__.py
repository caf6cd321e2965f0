"""The native ``BlindSightAttention`` kernel for ONNX Runtime's CPU provider.

``python -m blindsight.native build`` compiles it (:mod:`blindsight.native.build`);
:func:`blindsight.runtime.session.make_session` registers it when it is built
(``native=None``: when built and every node is supported; ``True``: required;
``False``: never). ONNX Runtime then runs the kernel instead of each node's
model-local function, so the compiled graph is the same either way. Without the
library everything runs on the function bodies.

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

from blindsight.attention.schema import DOMAIN, FORMATS, OP_TYPE, AttentionConfig
from blindsight.native.build import API_VERSION, BUILD, HEADER_VERSION, LIBRARY_NAME

#: set to a path to load another build of the library
LIBRARY_ENV = "BLINDSIGHT_NATIVE_LIB"
#: the providers the native kernel runs on (a CUDA kernel would add "cuda")
PROVIDERS = ("cpu",)
DTYPES = ("float32", "float16")
NO_NODE = "no BlindSightAttention node"
#: the categories whose key intervals src/op.cc knows (a new row of RULES needs its intervals there)
CATEGORIES = ("dense", "sink", "intra", "intra_sink")


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


def unsupported(cfg: AttentionConfig, provider: str = "cpu") -> str | None:
    """Why the native kernel cannot run this node (None: it can). The runtime then
    keeps the whole model on its function bodies."""
    if provider not in PROVIDERS:
        return f"the native kernel runs on the CPU provider only, not {provider!r}"
    if cfg.dtype not in DTYPES:
        return f"layer {cfg.layer}: {cfg.dtype} attention (the native kernel takes {', '.join(DTYPES)})"
    unknown = sorted(set(cfg.categories) - set(CATEGORIES))
    if unknown:
        return f"layer {cfg.layer}: the native kernel has no key intervals for {', '.join(unknown)}"
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


def node_configs(model) -> list[AttentionConfig]:
    """The AttentionConfig of every BlindSightAttention node of an onnx ModelProto's
    main graph (dtype read off the graph's typed values; float32 where unknown)."""
    from onnx import helper

    g = model.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    names = {1: "float32", 10: "float16", 16: "bfloat16"}
    floats = {names[t] for t in types.values() if t in names}
    fallback = next(iter(floats)) if len(floats) == 1 else "float32"
    out = []
    for node in g.node:
        if not (node.domain == DOMAIN and node.op_type == OP_TYPE):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        cats = tuple(c.decode() if isinstance(c, bytes) else c for c in attrs.pop("categories", ()))
        dtype = names.get(types.get(node.input[0]), fallback)
        mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
        mask_type = "none" if mask is None else ("bool" if types.get(mask) == 9 else "float")
        known = {k: attrs[k] for k in ("num_heads", "kv_num_heads", "scale", "sink_tokens", "layer", "is_causal",
                                       "local_window_size", "image_blocks", "qkv_format") if k in attrs}
        out.append(AttentionConfig(head_size=0, categories=cats, mask_type=mask_type, dtype=dtype, **known))
    return out


def plan(model, provider: str = "cpu") -> Plan:
    """Whether the native kernel can run every BlindSightAttention node of ``model``
    (an onnx ModelProto), and why not."""
    path = library_path()
    if path is None:
        return Plan(False, "native kernel not built: python -m blindsight.native build")
    try:
        cfgs = node_configs(model)
    except (ValueError, TypeError) as exc:
        return Plan(False, f"a BlindSightAttention node the native kernel cannot read: {exc}")
    if not cfgs:
        return Plan(False, NO_NODE)
    by_layer: dict[int, tuple] = {}
    for cfg in cfgs:
        why = unsupported(cfg, provider)
        if why:
            return Plan(False, why)
        if by_layer.setdefault(cfg.layer, cfg.categories) != cfg.categories:
            return Plan(False, f"two nodes of layer {cfg.layer} have different categories (the kernel keys nodes by layer)")
    return Plan(True, f"{path.name}, {isa()}")


def register(opts) -> None:
    """Register the library with an onnxruntime SessionOptions."""
    path = library_path()
    if path is None:
        raise FileNotFoundError("native kernel not built: python -m blindsight.native build")
    opts.register_custom_ops_library(str(path))
