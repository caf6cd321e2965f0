"""Pass: number the attention layers and write the profile into their nodes.

Layer L is the L-th BlindSightAttention node in topological order (docs/specification.md §3);
every node gets its categories, layer, sink tokens and the model's image-block
rule, and reads the graph's new ``image_spans`` input."""

from __future__ import annotations

import onnx_ir as ir

from blindsight.attention.schema import IMAGE_BLOCKS_METADATA, INPUTS, SPANS_INPUT, is_blindsight, read_attribute, write_attributes
from blindsight.profile import Profile


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    model.graph.sort()
    return [n for n in model.graph if is_blindsight(n)]


def exported_image_blocks(model: ir.Model) -> bool:
    return model.metadata_props.get(IMAGE_BLOCKS_METADATA) == "1"


def annotate(model: ir.Model, profile: Profile, image_blocks: bool = False) -> int:
    """Apply ``profile``; raises ProfileError when it disagrees with the graph. Returns the node count."""
    nodes = attention_nodes(model)
    profile.check_model(
        len(nodes),
        [read_attribute(n, "num_heads") for n in nodes],
        [read_attribute(n, "kv_num_heads") for n in nodes],
    )
    spans = ir.Value(name=SPANS_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["num_images", 2]))
    model.graph.inputs.append(spans)
    for layer, (node, cats) in enumerate(zip(nodes, profile.layers)):
        write_attributes(node, categories=list(cats), layer=layer, sink_tokens=profile.sink_tokens,
                         image_blocks=int(image_blocks))
        node.name = f"blindsight_attention_{layer}"
        node.resize_inputs(len(INPUTS))
        node.replace_input_with(INPUTS.index(SPANS_INPUT), spans)
    return len(nodes)
