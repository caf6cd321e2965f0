"""Run a compiled model: spans are validated before they reach the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from blindsight.errors import BlindSightError
from blindsight.attention.schema import SPANS_INPUT
from blindsight.attention import validate_spans

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}


def resolve_provider(name: str) -> list[str]:
    available = ort.get_available_providers()
    if name not in PROVIDERS:
        raise BlindSightError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[name] not in available:
        have = ", ".join(k for k, v in PROVIDERS.items() if v in available)
        raise BlindSightError(f"execution provider {name!r} is not available in this onnxruntime build; available: {have}")
    return [PROVIDERS[name]] + (["CPUExecutionProvider"] if name != "cpu" else [])


class CompiledSession:
    """An InferenceSession over a compiled model that takes spans as a separate argument."""

    def __init__(self, path, provider: str = "cpu", threads: int | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=resolve_provider(provider))
        self.input_names = [i.name for i in self.session.get_inputs()]
        if SPANS_INPUT not in self.input_names:
            raise BlindSightError(f"{path} has no '{SPANS_INPUT}' input: it is not a compiled BlindSight model")

    def run(self, feeds: dict, image_spans, seq_len: int | None = None):
        spans = validate_spans(image_spans, seq_len)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        feeds[SPANS_INPUT] = np.ascontiguousarray(spans, dtype=np.int64)
        return self.session.run(None, feeds)
