"""The ``ai.blindsight::BlindSightAttention`` operator: its signature and the
static configuration a lowering is generated from (README documents it)."""

from __future__ import annotations

import dataclasses
import hashlib

DOMAIN = "ai.blindsight"
OP_TYPE = "BlindSightAttention"
OP_VERSION = 1
SPANS_INPUT = "image_spans"

# Input order of the node and of its function body.
INPUTS = ("query", "key", "value", "attn_mask", "image_spans")
OUTPUTS = ("output",)
FORMATS = ("BNSH", "BSD")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything a lowering needs to know statically about one node."""

    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    categories: tuple[str, ...]
    sink_tokens: int = 1
    layer: int = 0
    is_causal: int = 1
    local_window_size: int = -1
    qkv_format: str = "BNSH"
    mask_type: str = "none"  # "none", "bool" (True keeps) or "float" (additive)

    def __post_init__(self):
        if self.num_heads % self.kv_num_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of kv_num_heads {self.kv_num_heads}")
        if len(self.categories) != self.num_heads:
            raise ValueError(f"{len(self.categories)} categories for {self.num_heads} heads")
        if self.qkv_format not in FORMATS:
            raise ValueError(f"qkv_format must be one of {FORMATS}")

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_num_heads

    def kv_head(self, h: int) -> int:
        return h // self.group

    def overload(self, lowering: str) -> str:
        """Functions are keyed by (domain, name, overload); one body per distinct config."""
        key = dataclasses.replace(self, layer=0)
        digest = hashlib.sha256(repr((lowering, key)).encode()).hexdigest()[:12]
        return f"{lowering}_{digest}"

    def attributes(self) -> dict:
        return dict(
            num_heads=self.num_heads,
            kv_num_heads=self.kv_num_heads,
            scale=float(self.scale),
            categories=list(self.categories),
            sink_tokens=self.sink_tokens,
            layer=self.layer,
            is_causal=self.is_causal,
            local_window_size=self.local_window_size,
            qkv_format=self.qkv_format,
        )
