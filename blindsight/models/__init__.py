"""Tiny VLM language-model prefill exports (ONNX) for graph-pattern work."""

from .configs import FAMILIES, tiny_config
from .export import (
    FORMS,
    LanguageModelPrefill,
    example_inputs,
    export_language_model,
    load_language_model,
    text_dims,
)

__all__ = [
    "FAMILIES",
    "FORMS",
    "LanguageModelPrefill",
    "example_inputs",
    "export_language_model",
    "load_language_model",
    "text_dims",
    "tiny_config",
]
