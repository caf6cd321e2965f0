"""FLOP accounting (bs-flops): attention and whole-prefill FLOPs, dense vs BlindSight."""

from blindsight.attention.pairs import attention_pairs
from blindsight.flops.dims import CONFIG_PACKAGE, ModelDims, builtin_models, dims_from_config, model_dims
from blindsight.flops.report import FlopReport, count_flops, linear_flops
from blindsight.flops.template import Template

__all__ = [
    "CONFIG_PACKAGE", "FlopReport", "ModelDims", "Template", "attention_pairs", "builtin_models",
    "count_flops", "dims_from_config", "linear_flops", "model_dims",
]
