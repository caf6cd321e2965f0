"""What FLOP accounting needs of a decoder, read off a transformers config
(a built-in public one from :mod:`blindsight.configs`, a config.json, a
checkpoint directory, a dict or a config object)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from blindsight import configs, families
from blindsight.errors import BlindSightError

CONFIG_PACKAGE = configs.__name__


@dataclass(frozen=True)
class ModelDims:
    """What FLOP accounting needs of a decoder: one entry per layer in ``layer_windows``
    (None = full attention, else the sliding-window size); ``image_blocks``: image
    soft tokens also attend later ones of their block (Gemma 3)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_windows: tuple = field(default=())
    image_blocks: bool = False

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise BlindSightError(f"{self.name}: {len(self.layer_windows)} layer windows for {self.num_layers} layers")


def builtin_models() -> list[str]:
    return configs.names()


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
            image_blocks=families.image_blocks(config.get("model_type") or t.get("model_type")),
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
        return dims_from_config(configs.transformers_dict(name), name)
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


