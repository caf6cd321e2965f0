"""FLOP accounting: attention and whole-prefill FLOPs, dense vs BlindSight.

Attention FLOPs of one head are 4 x head_dim x (allowed causal (q, k) pairs)
(SPEC §2): 2 for Q K^T and 2 for P V per pair. Pairs are counted in closed
form per query row (prefix sums over key classes), so a 300K-token prompt
costs O(S) per head category, not O(S^2); tests check the counts against
explicit masks from :mod:`blindsight.semantics`.

Whole prefill per layer = projections (Q, K, V, O) + gated MLP (three
matrices, as in Qwen2 and Gemma 3) + attention; plus the LM head over
``logit_positions`` tokens (1 by default: time to first token needs only the
last position's logits). Norms, rotary embeddings and the embedding lookup
are elementwise or gathers and are left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from blindsight.errors import BlindSightError
from blindsight.semantics import CATEGORIES, KEY_ANY, KEY_SAME_IMAGE, KEY_SINK, uses, validate_spans

CONFIG_PACKAGE = "blindsight.bench.configs"


@dataclass(frozen=True)
class ModelDims:
    """What FLOP accounting needs of a decoder: one entry per layer in ``layer_windows``
    (None = full attention, else the sliding-window size)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_windows: tuple = field(default=())

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise BlindSightError(f"{self.name}: {len(self.layer_windows)} layer windows for {self.num_layers} layers")


def builtin_models() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".json"))


def _layer_windows(t: dict, num_layers: int) -> tuple:
    window = t.get("sliding_window")
    types = t.get("layer_types")
    if types is None and t.get("sliding_window_pattern"):
        # older Gemma 3 configs: every pattern-th layer is global
        pattern = int(t["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if types is None:
        use = t.get("use_sliding_window", False) and window
        types = ["sliding_attention" if use else "full_attention"] * num_layers
    return tuple(int(window) if ty == "sliding_attention" and window else None for ty in types)


def dims_from_config(config: dict, name: str = "config") -> ModelDims:
    """ModelDims of a transformers config dict (a VLM config with ``text_config`` or a text config)."""
    t = dict(config.get("text_config") or config)
    try:
        layers = int(t["num_hidden_layers"])
        heads = int(t["num_attention_heads"])
        hidden = int(t["hidden_size"])
        return ModelDims(
            name=name,
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=int(t["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(t.get("num_key_value_heads") or heads),
            head_dim=int(t.get("head_dim") or hidden // heads),
            vocab_size=int(t.get("vocab_size") or config.get("vocab_size") or 0),
            layer_windows=_layer_windows(t, layers),
        )
    except KeyError as exc:
        raise BlindSightError(f"{name}: the config has no {exc.args[0]!r}; pass a transformers config.json of a decoder or VLM") from None


def model_dims(spec) -> ModelDims:
    """Built-in name (see :func:`builtin_models`), a config.json path, a checkpoint
    directory, a dict or a transformers config object."""
    if isinstance(spec, ModelDims):
        return spec
    if isinstance(spec, dict):
        return dims_from_config(spec)
    if hasattr(spec, "to_dict"):
        return dims_from_config(spec.to_dict(), getattr(spec, "name_or_path", "") or "config")
    name = str(spec)
    if name in builtin_models():
        text = resources.files(CONFIG_PACKAGE).joinpath(f"{name}.json").read_text()
        return dims_from_config(json.loads(text), name)
    path = Path(os.fspath(spec))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise BlindSightError(f"no model {name!r}: give a built-in name ({', '.join(builtin_models())}) or a config.json / checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BlindSightError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return dims_from_config(config, str(path))


@dataclass(frozen=True)
class Template:
    """SPEC §6 prompt: ``prefix`` text tokens, then N images of ``image_len`` tokens,
    each after ``gap`` text tokens, then a ``question``."""

    num_images: int
    image_len: int
    prefix: int = 24
    gap: int = 8
    question: int = 32

    @property
    def spans(self) -> np.ndarray:
        starts = self.prefix + self.gap + np.arange(self.num_images, dtype=np.int64) * (self.gap + self.image_len)
        return np.stack([starts, starts + self.image_len], axis=1).reshape(-1, 2)

    @property
    def seq_len(self) -> int:
        return self.prefix + self.num_images * (self.gap + self.image_len) + self.question


def _prefix(flags: np.ndarray) -> np.ndarray:
    """c[i] = number of set flags in [0, i)."""
    return np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])


def attention_pairs(category: str, spans, seq_len: int, sink_tokens: int = 1, window: int | None = None) -> int:
    """Allowed causal (q, k) pairs of one head of ``category`` over a prefill (SPEC §2),
    with an optional sliding window (k > q - window)."""
    if category not in CATEGORIES:
        raise BlindSightError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    spans = validate_spans(spans, seq_len)
    q = np.arange(seq_len, dtype=np.int64)
    lo = np.maximum(q - window + 1, 0) if window else np.zeros_like(q)
    total = q - lo + 1
    if uses(category, KEY_ANY) or len(spans) == 0:
        return int(total.sum())
    image = np.full(seq_len, -1, dtype=np.int64)
    sink = np.zeros(seq_len, dtype=bool)
    for i, (s, e) in enumerate(spans):
        image[s:e] = i
        sink[s : min(s + sink_tokens, e)] = True
    text_c, sink_c = _prefix(image < 0), _prefix(sink)

    def in_range(c, a, b):  # flags in [a, b] inclusive
        return c[b + 1] - c[a]

    count = in_range(text_c, lo, q)
    img_q = image >= 0
    own_start = np.where(img_q, spans[np.maximum(image, 0), 0], 0)
    own_lo = np.maximum(own_start, lo)
    own = np.where(img_q, q - own_lo + 1, 0)  # own-image keys in the window, <= q
    sinks = in_range(sink_c, lo, q)
    own_sinks = np.where(img_q, np.maximum(np.minimum(own_start + sink_tokens, q + 1) - own_lo, 0), 0)
    extra = np.zeros_like(q)
    if uses(category, KEY_SAME_IMAGE):
        extra = extra + own
        if uses(category, KEY_SINK):
            extra = extra + sinks - own_sinks
    elif uses(category, KEY_SINK):
        extra = extra + sinks
    return int(np.where(img_q, count + extra, total).sum())


@dataclass
class FlopReport:
    model: str
    seq_len: int
    num_images: int
    attention_dense: int
    attention_sparse: int
    prefill_dense: int
    prefill_sparse: int
    per_category_heads: dict

    @property
    def attention_reduction(self) -> float:
        return 1.0 - self.attention_sparse / self.attention_dense if self.attention_dense else 0.0

    @property
    def prefill_reduction(self) -> float:
        return 1.0 - self.prefill_sparse / self.prefill_dense if self.prefill_dense else 0.0

    @property
    def attention_bound(self) -> float:
        """Attention speed-up bound (dense / sparse FLOPs)."""
        return self.attention_dense / self.attention_sparse

    @property
    def prefill_bound(self) -> float:
        """Amdahl bound of the end-to-end prefill speed-up."""
        return self.prefill_dense / self.prefill_sparse

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            attention_reduction=self.attention_reduction,
            prefill_reduction=self.prefill_reduction,
            attention_bound=self.attention_bound,
            prefill_bound=self.prefill_bound,
        )
        return d


def _layers_of(layers, dims: ModelDims) -> list[list[str]]:
    if layers is None:
        return [["dense"] * dims.num_heads for _ in range(dims.num_layers)]
    layers = getattr(layers, "layers", layers)  # a Profile
    if len(layers) != dims.num_layers or any(len(l) != dims.num_heads for l in layers):
        raise BlindSightError(
            f"the profile has {len(layers)} layers x {len(layers[0]) if len(layers) else 0} heads; "
            f"{dims.name} has {dims.num_layers} x {dims.num_heads}"
        )
    return [list(l) for l in layers]


def linear_flops(dims: ModelDims, seq_len: int, logit_positions: int = 1) -> int:
    """Projections, gated MLP and LM head of one prefill (no attention core)."""
    h, d = dims.hidden_size, dims.head_dim
    qkvo = 2 * seq_len * h * d * (2 * dims.num_heads + 2 * dims.num_kv_heads)
    mlp = 2 * seq_len * 3 * h * dims.intermediate_size
    return dims.num_layers * (qkvo + mlp) + 2 * logit_positions * h * dims.vocab_size


def count_flops(dims, layers=None, spans=(), seq_len: int | None = None, sink_tokens: int = 1, logit_positions: int = 1) -> FlopReport:
    """Dense vs BlindSight FLOPs of one prefill. ``layers``: categories per layer and
    query head (list of lists or a Profile); None = all dense."""
    dims = model_dims(dims)
    if seq_len is None:
        raise BlindSightError("count_flops needs seq_len")
    spans = validate_spans(spans, seq_len)
    cats = _layers_of(layers, dims)
    per_head = 4 * dims.head_dim
    cache: dict = {}

    def pairs(cat, window):
        if (cat, window) not in cache:
            cache[cat, window] = attention_pairs(cat, spans, seq_len, sink_tokens, window)
        return cache[cat, window]

    dense = sparse = 0
    heads: dict[str, int] = {c: 0 for c in CATEGORIES}
    for layer, window in zip(cats, dims.layer_windows):
        for c in layer:
            heads[c] += 1
            dense += per_head * pairs("dense", window)
            sparse += per_head * pairs(c, window)
    linear = linear_flops(dims, seq_len, logit_positions)
    return FlopReport(dims.name, seq_len, len(spans), dense, sparse, linear + dense, linear + sparse, heads)
