"""ONNX Runtime sessions: the one session factory, and compiled models whose spans are
validated before they reach the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from blindsight.errors import BlindSightError
from blindsight.attention.schema import SPANS_INPUT, TOKEN_TYPE_INPUT
from blindsight.attention.spans import token_type_ids
from blindsight.attention import validate_spans

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}


_SHORT = {v: k for k, v in PROVIDERS.items()}


def resolve_provider(name: str) -> list[str]:
    """Providers for a session: a short name ('cpu', 'cuda', ...) or ONNX Runtime's
    ('CUDAExecutionProvider'); accelerators fall back to the CPU."""
    name = _SHORT.get(name, name)
    available = ort.get_available_providers()
    if name not in PROVIDERS:
        raise BlindSightError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[name] not in available:
        have = ", ".join(k for k, v in PROVIDERS.items() if v in available)
        raise BlindSightError(f"execution provider {name!r} is not available in this onnxruntime build; available: {have}")
    return [PROVIDERS[name]] + (["CPUExecutionProvider"] if name != "cpu" else [])


def make_session(
    model,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    inter_threads: int | None = None,
    arena: bool = True,
    log_severity: int | None = None,
    profile_prefix: str | None = None,
    native: bool | None = None,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession over ``model`` (a path, serialized bytes or an onnx.ModelProto).

    ``threads``/``inter_threads``: intra-/inter-op threads (None or 0: ONNX Runtime's
    default); ``arena``: the CPU memory arena; ``log_severity``: ONNX Runtime's log level
    (None: its default); ``profile_prefix``: turn on ONNX Runtime's profiler, files there.
    ``native``: run BlindSightAttention nodes on the native CPU kernel
    (:mod:`blindsight.native`): None when it is built and takes every node, True
    required (an error says why not), False never (the function bodies).
    ``config``: session configuration entries (e.g. ``session.disable_prepacking``).
    The session's ``blindsight_attention`` attribute says which path runs.
    """
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    if inter_threads:
        opts.inter_op_num_threads = inter_threads
    if log_severity is not None:
        opts.log_severity_level = log_severity
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    providers = resolve_provider(provider)
    route = attention_route(model, provider, native)
    if route.native:
        from blindsight import native as native_kernel

        native_kernel.register(opts)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    data = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(data, opts, providers=providers)
    sess.blindsight_attention = route.label
    sess.blindsight_native = route.native
    return sess


def attention_route(model, provider: str = "cpu", native: bool | None = None):
    """Which path a session over ``model`` runs its BlindSightAttention nodes on
    (a :class:`blindsight.native.Plan`); ``native=True`` raises when it cannot be the kernel."""
    from blindsight import native as native_kernel

    if native is False:
        return native_kernel.Plan(False, "native kernel off")
    short = _SHORT.get(provider, provider)
    if native is None and not native_kernel.available():
        return native_kernel.Plan(False, "native kernel not built")
    if native is None and short not in native_kernel.PROVIDERS:
        return native_kernel.Plan(False, f"the native kernel runs on the CPU provider only, not {short!r}")
    try:
        graph = _graph_of(model)
    except Exception as exc:  # a missing or corrupt model: ONNX Runtime's own error says so below
        if native:
            raise BlindSightError(f"the native kernel cannot read this model: {exc}") from None
        return native_kernel.Plan(False, "model not readable")
    plan = native_kernel.plan(graph, short)
    if native and not plan.native and plan.reason != native_kernel.NO_NODE:  # (a graph without nodes needs no kernel)
        raise BlindSightError(f"the native kernel cannot run this model: {plan.reason}")
    return plan


def _graph_of(model):
    """An onnx ModelProto of a path, bytes or proto, without loading external weights."""
    import onnx

    if hasattr(model, "graph"):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


class CompiledSession:
    """An InferenceSession over a compiled model that takes spans as a separate argument."""

    def __init__(self, path, provider: str = "cpu", threads: int | None = None, native: bool | None = None):
        self.path = Path(path)
        self.session = make_session(path, provider=provider, threads=threads, native=native)
        #: which path runs the attention: "native kernel (...)" or "function bodies (...)"
        self.attention = self.session.blindsight_attention
        self.input_names = [i.name for i in self.session.get_inputs()]
        if SPANS_INPUT not in self.input_names:
            raise BlindSightError(f"{path} has no '{SPANS_INPUT}' input: it is not a compiled BlindSight model")

    def run(self, feeds: dict, image_spans, seq_len: int | None = None):
        """``seq_len``: the prompt's absolute length so far (past + new tokens).
        A Gemma 3 export's ``token_type_ids``, when not given, follow the spans."""
        spans = validate_spans(image_spans)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if TOKEN_TYPE_INPUT in self.input_names and TOKEN_TYPE_INPUT not in feeds:
            rows, new = _rows_and_new_tokens(feeds)
            past = (seq_len - new) if seq_len is not None else 0
            # first: a chunk that splits an image is the fault to name, not the spans past it
            feeds[TOKEN_TYPE_INPUT] = token_type_ids(spans, new, past, rows)
        feeds[SPANS_INPUT] = np.ascontiguousarray(validate_spans(spans, seq_len), dtype=np.int64)
        return self.session.run(None, feeds)


def _rows_and_new_tokens(feeds: dict) -> tuple[int, int]:
    x = feeds.get("inputs_embeds", feeds.get("input_ids"))
    if x is None:
        raise BlindSightError("token_type_ids cannot be derived without inputs_embeds or input_ids in the feeds")
    return int(x.shape[0]), int(x.shape[1])


#: session configuration that leaves MatMul weights unpacked (in the file mapping, shared)
NO_PREPACK = {"session.disable_prepacking": "1"}
PREPACK_CHOICES = ("auto", "on", "off")


def external_data_bytes(path) -> int:
    """Bytes of the external-data files a model names (read without loading them)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def weight_bytes(path) -> int:
    """Bytes of a model's weights: the .onnx file and the external-data files it names."""
    return Path(path).stat().st_size + external_data_bytes(path)


def available_memory() -> int | None:
    """MemAvailable of this machine in bytes (Linux), else None."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prepack_weights(paths, choice: str = "auto") -> bool:
    """Whether ONNX Runtime should pre-pack the MatMul weights of ``paths``.

    Pre-packing keeps a packed private copy of every MatMul weight, and ONNX
    Runtime drops the original once every consumer has packed it: weights mapped
    from external data are then released, so the packed copy takes the place of
    the mapped pages rather than adding to them. Measured at Qwen2-VL-2B's
    28-layer language model (fp32, 5,889 MiB of external data): a peak of
    6,868 MiB at load with it, 5,978 MiB resident afterwards; the whole pipeline
    with 4 images of 1,024 tokens peaked at 10,105 and 10,103 MiB and reached its first
    token 1.10x sooner with it (the same tokens). At 4 layers it bought 1.13x in
    prefill, and after a short text prompt at full depth 1.33x in decode (5.7
    against 4.3 tokens/s). The packed copy is private memory the kernel cannot
    page back to the file, so ``auto`` keeps pre-packing unless one copy of the
    weights would take more than 60% of the memory available now."""
    if choice not in PREPACK_CHOICES:
        raise BlindSightError(f"--prepack {choice!r}: choose one of {', '.join(PREPACK_CHOICES)}")
    if choice != "auto":
        return choice == "on"
    free = available_memory()
    return free is None or sum(weight_bytes(p) for p in paths) <= 0.6 * free
