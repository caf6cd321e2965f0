"""Wrapping a builder's nodes as the op's model-local function."""

from __future__ import annotations

from onnx import helper

from blindsight.attention.schema import DOMAIN, INPUTS, OP_TYPE, OUTPUTS, AttentionConfig
from blindsight.passes.lowering.builder import MS_DOMAIN, OPSET, Builder

OUTPUT_NAME = OUTPUTS[0]


def make_function(b: Builder, cfg: AttentionConfig, lowering: str, output: str = OUTPUT_NAME, opset: int = OPSET):
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        [output],
        b.nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        overload=cfg.overload(lowering),
        doc_string=f"BlindSightAttention, {lowering} lowering, categories={','.join(cfg.categories)}",
    )


def rename_output(b: Builder, value: str, name: str = OUTPUT_NAME) -> str:
    b.nodes.append(helper.make_node("Identity", [value], [name]))
    return name


def produce_as_output(b: Builder, value: str, name: str = OUTPUT_NAME) -> None:
    """Let the op that computes ``value`` write the function output (an Identity would be a view)."""
    producer = next(n for n in reversed(b.nodes) if value in n.output)
    producer.output[list(producer.output).index(value)] = name
