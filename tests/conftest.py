from pathlib import Path

import pytest


class Exports:
    """Session cache: one export (and one torch module) per key."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict = {}
        self.modules: dict = {}

    def path(self, family: str, form: str, num_kv_heads: int = 2):
        from blindsight.models.configs import tiny_config
        from blindsight.models.export import export_language_model

        key = (family, form, num_kv_heads)
        if key not in self.paths:
            cfg = tiny_config(family, num_kv_heads=num_kv_heads)
            out = self.root / f"{family}_{form}_kv{num_kv_heads}.onnx"
            self.paths[key] = export_language_model(family, form, out, config=cfg)
        return self.paths[key]

    def module(self, family: str, attn: str, num_kv_heads: int = 2):
        from blindsight.models.configs import tiny_config
        from blindsight.models.export import load_language_model

        key = (family, attn, num_kv_heads)
        if key not in self.modules:
            self.modules[key] = load_language_model(family, tiny_config(family, num_kv_heads=num_kv_heads), attn)
        return self.modules[key]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("onnx_exports"))


@pytest.fixture(scope="session")
def exported(exports):
    """exported(family, form) -> path of the tiny export, made once per session."""
    return exports.path
