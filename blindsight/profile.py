"""Head profile, format v1 (docs/specification.md §3): load, validate, save."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from blindsight.errors import ProfileError
from blindsight.attention import CATEGORIES

FORMAT = "blindsight-profile"
VERSION = 1
_KEYS = {"format", "version", "model", "num_layers", "num_heads", "num_kv_heads", "sink_tokens", "layers", "calibration"}
_REQUIRED = ("format", "version", "num_layers", "num_heads", "layers")

# A layer like the paper's profiles: mostly sparse heads, a few dense (the benchmarks' mixed layer,
# named MIXED in their tables).
MIXED = "mixed"
MIX_CYCLE = ("intra", "sink", "intra_sink", "intra", "dense", "sink", "intra")


def mixed_layer(num_heads: int, cycle: Sequence[str] = MIX_CYCLE, offset: int = 0) -> tuple[str, ...]:
    """Categories of one layer: head h gets ``cycle[(offset + h) % len(cycle)]``."""
    return tuple(cycle[(offset + h) % len(cycle)] for h in range(num_heads))


@dataclasses.dataclass
class Profile:
    layers: list[list[str]]
    num_kv_heads: int | None = None
    sink_tokens: int = 1
    model: str = ""
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.layers = [list(layer) for layer in self.layers]
        validate_layers(self.layers, self.num_heads)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    @classmethod
    def uniform(cls, category: str, num_layers: int, num_heads: int, **kw) -> "Profile":
        return cls([[category] * num_heads for _ in range(num_layers)], **kw)

    @classmethod
    def mixed(cls, num_layers: int, num_heads: int, *, cycle: Sequence[str] = MIX_CYCLE, rotate: bool = False,
              first_dense: bool = False, **kw) -> "Profile":
        """Every layer a :func:`mixed_layer`; ``rotate``: layer L starts ``L`` places further
        along the cycle; ``first_dense``: layer 0 all dense (as calibrated profiles keep it)."""
        layers = [list(mixed_layer(num_heads, cycle, layer if rotate else 0)) for layer in range(num_layers)]
        if first_dense and layers:
            layers[0] = ["dense"] * num_heads
        return cls(layers, **kw)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for layer in self.layers:
            for c in layer:
                out[c] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads if self.num_kv_heads is not None else self.num_heads,
            "sink_tokens": self.sink_tokens,
            "layers": self.layers,
        }
        if self.calibration:
            doc["calibration"] = self.calibration
        return doc

    def check_model(self, num_layers: int, num_heads_per_layer: list[int], kv_heads_per_layer: list[int] | None = None):
        """Raise ProfileError when the profile disagrees with a model's attention layers."""
        if self.num_layers != num_layers:
            raise ProfileError(
                f"profile has {self.num_layers} layers but the model has {num_layers} attention layers"
            )
        for i, (layer, nh) in enumerate(zip(self.layers, num_heads_per_layer)):
            if len(layer) != nh:
                raise ProfileError(f"layer {i}: profile has {len(layer)} heads but the model's layer has {nh} query heads")
        if kv_heads_per_layer is not None and self.num_kv_heads is not None:
            for i, nkv in enumerate(kv_heads_per_layer):
                # exporters may repeat K/V per query head, so the graph can show more KV heads
                if nkv not in (self.num_kv_heads, num_heads_per_layer[i]):
                    raise ProfileError(
                        f"layer {i}: profile says {self.num_kv_heads} key/value heads but the model's layer has {nkv}"
                    )


def validate_layers(layers, num_heads: int | None = None):
    if not isinstance(layers, list) or not layers:
        raise ProfileError("profile 'layers' must be a non-empty list of per-layer category lists")
    for i, layer in enumerate(layers):
        if not isinstance(layer, list) or not layer:
            raise ProfileError(f"layer {i}: expected a non-empty list of category names")
        if num_heads is not None and len(layer) != num_heads:
            raise ProfileError(f"layer {i}: has {len(layer)} heads, expected num_heads = {num_heads}")
        for h, c in enumerate(layer):
            if c not in CATEGORIES:
                raise ProfileError(
                    f"layer {i}, head {h}: unknown category {c!r}; expected one of {', '.join(CATEGORIES)}"
                )


def _int(doc, key, minimum):
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProfileError(f"profile '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def from_json(doc: Any) -> Profile:
    if not isinstance(doc, dict):
        raise ProfileError("profile must be a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise ProfileError(f"profile has unknown top-level key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ProfileError(f"profile is missing required key(s) {', '.join(map(repr, missing))}")
    if doc["format"] != FORMAT:
        raise ProfileError(f"profile 'format' is {doc['format']!r}, expected {FORMAT!r}")
    if doc["version"] != VERSION:
        raise ProfileError(f"profile 'version' is {doc['version']!r}; this tool reads version {VERSION}")
    num_layers = _int(doc, "num_layers", 1)
    num_heads = _int(doc, "num_heads", 1)
    num_kv = _int(doc, "num_kv_heads", 1) if "num_kv_heads" in doc else None
    sink_tokens = _int(doc, "sink_tokens", 1) if "sink_tokens" in doc else 1
    layers = doc["layers"]
    validate_layers(layers)
    if len(layers) != num_layers:
        raise ProfileError(f"profile 'num_layers' is {num_layers} but 'layers' holds {len(layers)} lists")
    validate_layers(layers, num_heads)
    if num_kv is not None and num_heads % num_kv:
        raise ProfileError(f"profile 'num_heads' ({num_heads}) is not a multiple of 'num_kv_heads' ({num_kv})")
    calibration = doc.get("calibration", {})
    if not isinstance(calibration, dict):
        raise ProfileError("profile 'calibration' must be a JSON object")
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise ProfileError("profile 'model' must be a string")
    return Profile(layers, num_kv_heads=num_kv, sink_tokens=sink_tokens, model=model, calibration=calibration)


def load(path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    return from_json(doc)


def save(profile: Profile, path) -> None:
    """Write atomically: a reader never sees a half-written profile."""
    path = Path(path)
    text = json.dumps(profile.to_json(), indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
