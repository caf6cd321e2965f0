"""Dense vs BlindSight FLOPs of one prefill: attention (4 x head_dim x allowed
pairs, docs/specification.md §2, counted by :mod:`blindsight.attention.pairs`) and the whole
prefill.

Whole prefill per layer = projections (Q, K, V, O) + gated MLP (three
matrices, as in Qwen2 and Gemma 3) + attention; plus the LM head over
``logit_positions`` tokens (1 by default: time to first token needs only the
last position's logits). Norms, rotary embeddings and the embedding lookup
are elementwise or gathers and are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blindsight.attention import CATEGORIES, validate_spans
from blindsight.attention.pairs import attention_pairs
from blindsight.errors import BlindSightError
from blindsight.flops.dims import ModelDims, model_dims


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
            cache[cat, window] = attention_pairs(cat, spans, seq_len, sink_tokens, window, image_blocks=dims.image_blocks)
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
