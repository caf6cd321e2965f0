"""The ``ai.blindsight::BlindSightAttention`` operator's schema: its inputs,
outputs and attributes (the README's operator section documents each), and
:class:`AttentionConfig`, the one object that writes and reads them."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from blindsight.attention.semantics import CLAUSE_BITS, RULES, clause_names, key_clauses
from blindsight.errors import ModelError

DOMAIN = "ai.blindsight"
OP_TYPE = "BlindSightAttention"
OP_VERSION = 1
SPANS_INPUT = "image_spans"
#: metadata of an exported graph whose image tokens attend bidirectionally
#: within their block (bs-export writes "1" for Gemma 3; bs-compile then sets
#: every node's ``image_blocks``)
IMAGE_BLOCKS_METADATA = "blindsight.image_blocks"
#: the exported Gemma 3 graphs' input marking image soft tokens (transformers' name)
TOKEN_TYPE_INPUT = "token_type_ids"

# Input order of the node and of its function body.
INPUTS = ("query", "key", "value", "attn_mask", SPANS_INPUT)
OUTPUTS = ("output",)
FORMATS = ("BNSH", "BSD")
MASK_TYPES = ("none", "bool", "float")
# Float types of Q/K/V (and of a float mask and the output) that the op takes.
DTYPES = ("float32", "float16", "bfloat16")
# The short names command lines take (bs-export, bs-bench --dtype).
SHORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int", "float", "string", "strings", "ints" (the ONNX attribute type)
    default: Any  # None: required
    meaning: str
    derived: bool = False  # written from other attributes; a reader checks that it agrees with them


ATTRIBUTES = (
    Attribute("num_heads", "int", None, "number of query heads H"),
    Attribute("kv_num_heads", "int", None, "number of key/value heads; divides H (head h reads KV head h / (H / kv_num_heads))"),
    Attribute("scale", "float", None, "scale of Q K^T (1/sqrt(head_size) in most models)"),
    Attribute("categories", "strings", None, "H category names, one per query head (docs/specification.md §2)"),
    Attribute("key_clauses", "ints", None,
              "H bit sets, one per query head, derived from categories: the key clauses of the head's row of the "
              "rule table that an image query may see, ORed together (" +
              ", ".join(f"{bit} {c.name}" for c, bit in CLAUSE_BITS.items()) +
              "; 1 << 30: a clause outside these); text queries see every key whatever the bits. The native kernel "
              "reads these, not the category names; a node without them runs on its function body only",
              derived=True),
    Attribute("sink_tokens", "int", 1, "leading tokens of every image span that count as sinks"),
    Attribute("layer", "int", 0, "index of this attention core in topological order (the profile's layer)"),
    Attribute("is_causal", "int", 1, "1: apply causality in addition to attn_mask; 0: attn_mask carries it"),
    Attribute("local_window_size", "int", -1, "sliding window in tokens (key k allowed for query q only if q - k < window); -1: none"),
    Attribute("image_blocks", "int", 0, "1: Gemma 3's bidirectional image blocks: the tokens of a span strictly between its first and last token (token_type_ids = 1) also see the later tokens of that block (causality becomes causality or the same block; the window and attn_mask still apply); 0: none"),
    Attribute("qkv_format", "string", "BNSH", "BNSH: Q/K/V are [B, heads, S, D]; BSD: [B, S, heads x D]"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)


def is_blindsight(node) -> bool:
    """A BlindSightAttention node (onnx-ir or onnx proto)."""
    return node.domain == DOMAIN and node.op_type == OP_TYPE


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything a lowering needs to know statically about one node: the
    attributes, plus ``head_size`` and ``mask_type`` read off its inputs."""

    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    categories: tuple[str, ...]
    sink_tokens: int = 1
    layer: int = 0
    is_causal: int = 1
    local_window_size: int = -1
    image_blocks: int = 0
    qkv_format: str = "BNSH"
    mask_type: str = "none"  # "none", "bool" (True keeps) or "float" (additive, in ``dtype``)
    dtype: str = "float32"  # of Q/K/V, a float mask and the output
    #: per head, the bit set of its category's key clauses (:func:`~blindsight.attention.semantics.key_clauses`):
    #: derived from ``categories``, never given (so it is left out of repr, equality and :meth:`overload`)
    key_clauses: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_heads % self.kv_num_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of kv_num_heads {self.kv_num_heads}")
        if len(self.categories) != self.num_heads:
            raise ValueError(f"{len(self.categories)} categories for {self.num_heads} heads")
        unknown = sorted(set(self.categories) - set(RULES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; expected names from {', '.join(RULES)}")
        if self.qkv_format not in FORMATS:
            raise ValueError(f"qkv_format must be one of {FORMATS}")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.image_blocks not in (0, 1):
            raise ValueError(f"image_blocks must be 0 or 1, got {self.image_blocks!r}")
        object.__setattr__(self, "key_clauses", tuple(key_clauses(c) for c in self.categories))

    @classmethod
    def placeholder(cls, num_heads: int, kv_num_heads: int, scale: float, **attrs) -> "AttentionConfig":
        """A freshly rewritten node: all heads ``dense`` until a profile annotates it."""
        return cls(num_heads, kv_num_heads, 0, float(scale), ("dense",) * num_heads, **attrs)

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

    @property
    def elem_type(self) -> int:
        return elem_type_of(self.dtype)

    @property
    def np_dtype(self):
        return np_dtype_of(self.dtype)

    def attributes(self) -> dict:
        """The node's attributes, in schema order, with ONNX-ready Python values."""
        out = {}
        for a in ATTRIBUTES:
            value = getattr(self, a.name)
            out[a.name] = _PY[a.type](value)
        return out

    @classmethod
    def from_node(cls, node, *, require_key_clauses: bool = False) -> "AttentionConfig":
        """Read an onnx-ir node: attributes through the schema, the rest off its inputs.
        ``require_key_clauses``: a node without ``key_clauses`` (an older bs-compile's)
        raises :class:`MissingKeyClauses`; without it such a node reads as if it had them."""
        dtype = dtype_of(node)
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        mask_type = "none"
        if mask is not None:
            import onnx_ir as ir

            if mask.dtype is None:
                raise DTypeError(f"{node.name}: the attn_mask input has no known element type")
            mask_type = "bool" if mask.dtype == ir.DataType.BOOL else "float"
            if mask_type == "float" and _dtype_name(mask.dtype) != dtype:
                raise DTypeError(f"{node.name}: an additive mask of {_dtype_name(mask.dtype)} on {dtype} attention; "
                                 "export the model with the mask in the attention's dtype")
        attrs = node.attributes
        get = lambda name: attrs[name].value if name in attrs else None  # noqa: E731
        fmt, heads = get("qkv_format") or "BNSH", get("num_heads")
        q_shape = node.inputs[0].shape
        head_size = 0
        if q_shape is not None and isinstance(q_shape[-1], int) and heads:
            head_size = q_shape[-1] if fmt == "BNSH" else q_shape[-1] // heads
        return cls._read(get, node.name, require_key_clauses, head_size=head_size, mask_type=mask_type, dtype=dtype)

    @classmethod
    def from_proto(cls, node, types: dict | None = None, *, default_dtype: str = "float32",
                   require_key_clauses: bool = False) -> "AttentionConfig":
        """Read an onnx NodeProto, as :meth:`from_node` reads an onnx-ir node. ``types``: the
        element types of the graph's values (:func:`graph_types`); where the query's is unknown
        the dtype is ``default_dtype``. The head size is left 0."""
        from onnx import helper

        types = types or {}
        attrs = {a.name: a for a in node.attribute}

        def get(name):
            if name not in attrs:
                return None
            value = helper.get_attribute_value(attrs[name])
            if isinstance(value, bytes):
                return value.decode()
            if isinstance(value, list):
                return [v.decode() if isinstance(v, bytes) else v for v in value]
            return value

        dtype = _DTYPE_OF_ELEM.get(types.get(node.input[0]), default_dtype) if node.input else default_dtype
        mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
        mask_type = "none" if mask is None else ("bool" if types.get(mask) == _BOOL else "float")
        return cls._read(get, node.name, require_key_clauses, head_size=0, mask_type=mask_type, dtype=dtype)

    @classmethod
    def _read(cls, get, where: str, require_key_clauses: bool, **rest) -> "AttentionConfig":
        """The one parse of a node's attributes; ``get(name)``: the attribute's Python value or None."""
        attrs = {}
        for a in ATTRIBUTES:
            if a.derived:
                continue
            value = get(a.name)
            if value is None:
                if a.default is None:
                    raise ValueError(f"{where}: BlindSightAttention needs the attribute {a.name!r}")
                value = a.default
            attrs[a.name] = _PY[a.type](value)
        attrs["categories"] = tuple(attrs["categories"])
        cfg = cls(**attrs, **rest)
        stored = get(KEY_CLAUSES)
        if stored is None:
            if require_key_clauses:
                raise MissingKeyClauses(f"{where}: no {KEY_CLAUSES!r} attribute: compiled by an older bs-compile")
        elif tuple(int(b) for b in stored) != cfg.key_clauses:
            bad = next(h for h in range(max(len(stored), cfg.num_heads))
                       if h >= len(stored) or h >= cfg.num_heads or int(stored[h]) != cfg.key_clauses[h])
            said = _bits(int(stored[bad])) if bad < len(stored) else "nothing"
            want = _bits(cfg.key_clauses[bad]) if bad < cfg.num_heads else "nothing"
            raise KeyClausesError(
                f"{where}: key_clauses {list(stored)} disagree with categories {list(cfg.categories)}: head {bad} "
                f"says {said}, its category gives {want} (a rule table other than this one's, or an edited node); "
                "recompile the model with bs-compile")
        return cfg


KEY_CLAUSES = "key_clauses"


def _bits(bits: int) -> str:
    return f"{bits} ({', '.join(clause_names(bits)) or 'no clause'})"

_BOOL = 9  # onnx.TensorProto.BOOL
_DTYPE_OF_ELEM = {1: "float32", 10: "float16", 16: "bfloat16"}  # onnx.TensorProto element types


class KeyClausesError(ModelError):
    """A node whose ``key_clauses`` disagree with its ``categories``."""


class MissingKeyClauses(KeyClausesError):
    """A node without ``key_clauses`` where they are required (the native kernel reads them)."""


def graph_types(graph) -> dict[str, int]:
    """The element type of each typed value of an onnx GraphProto, by name."""
    types = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def proto_configs(graph, *, require_key_clauses: bool = False) -> list[AttentionConfig]:
    """The AttentionConfig of every BlindSightAttention node of an onnx GraphProto (dtype read off
    the graph's typed values; where a node's is unknown, the graph's one float type, else float32)."""
    types = graph_types(graph)
    floats = {_DTYPE_OF_ELEM[t] for t in types.values() if t in _DTYPE_OF_ELEM}
    fallback = next(iter(floats)) if len(floats) == 1 else "float32"
    return [AttentionConfig.from_proto(n, types, default_dtype=fallback, require_key_clauses=require_key_clauses)
            for n in graph.node if is_blindsight(n)]


def elem_type_of(dtype: str) -> int:
    """The ONNX TensorProto element type of a name in :data:`DTYPES`."""
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]


def np_dtype_of(dtype: str):
    """The numpy dtype of a name in :data:`DTYPES` (bfloat16 through ml_dtypes, as onnx uses it)."""
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type_of(dtype))


class DTypeError(ModelError):
    """An attention node in a dtype (or a mix of dtypes) the op does not take."""


def _dtype_name(dt) -> str:
    import onnx_ir as ir

    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(dt, getattr(dt, "name", str(dt)).lower())


def dtype_of(node) -> str:
    """The float dtype of an onnx-ir node's Q/K/V, checked to agree and to be one the op takes."""
    names = {_dtype_name(v.dtype) if v.dtype is not None else "unknown" for v in node.inputs[:3]}
    if len(names) != 1:
        raise DTypeError(f"{node.name}: query, key and value have different dtypes ({', '.join(sorted(names))})")
    (name,) = names
    if name not in DTYPES:
        raise DTypeError(f"{node.name}: attention in {name}; BlindSightAttention takes {', '.join(DTYPES)}")
    return name


_PY = {"int": int, "float": float, "string": str, "strings": list, "ints": lambda v: [int(x) for x in v]}


def _attribute(name: str) -> Attribute:
    for a in ATTRIBUTES:
        if a.name == name:
            return a
    raise KeyError(f"BlindSightAttention has no attribute {name!r}; it has {', '.join(ATTRIBUTE_NAMES)}")


def read_attribute(node, name: str):
    """An attribute of an onnx-ir node, or its schema default."""
    a = _attribute(name)
    attr = node.attributes.get(name)
    if attr is None:
        if a.default is None:
            raise ValueError(f"{node.name}: BlindSightAttention needs the attribute {name!r}")
        return a.default
    return attr.value


def write_attributes(node, **values) -> None:
    """Set attributes of an onnx-ir node with the schema's types."""
    import onnx_ir as ir

    kinds = {"int": ir.AttributeType.INT, "float": ir.AttributeType.FLOAT,
             "string": ir.AttributeType.STRING, "strings": ir.AttributeType.STRINGS, "ints": ir.AttributeType.INTS}
    derived = [name for name in values if _attribute(name).derived]
    if derived:
        raise ValueError(f"{', '.join(derived)} cannot be written: derived from categories, written with them")
    if "categories" in values:
        values = {**values, KEY_CLAUSES: [key_clauses(c) for c in values["categories"]]}
    for name, value in values.items():
        a = _attribute(name)
        node.attributes[name] = ir.Attr(name, kinds[a.type], _PY[a.type](value))
