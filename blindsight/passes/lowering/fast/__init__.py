"""Fast lowering: the masked-out work is skipped, on ONNX Runtime's fastest
kernels (docs/specification.md §5).

Per layer, query heads are grouped by category and each group's image-token
queries take the route the rule table (:mod:`blindsight.attention.semantics`)
implies for its category (:mod:`.plan`):

- every key (``dense``): one causal ``GroupQueryAttention`` (:mod:`.dense`);
- the own image plus keys fixed by their facts (``intra``: text; ``intra_sink``:
  text and sinks): per-image runs with those keys as past context, batch 1
  (:mod:`.image_runs`), or padded rows for a batch (:mod:`.padded_rows`);
- only keys fixed by their facts (``sink``: text and sinks): a grouped
  MatMul/Softmax over that short key set (:mod:`.key_set`).

Text queries of every sparse head are dense (:mod:`.text`). Each group's
output is assembled with one Gather (:mod:`.assembly`). Everything that
depends on the spans is computed in-graph from ``image_spans``; a prompt
with no image takes the dense route through an If.

Copies are what this lowering pays beyond the FLOPs it keeps, so: K/V are
never repeated per query head (MatMuls run per KV group), rows are gathered
from the input's own layout, and masked scores get a finite bias with empty
rows zeroed on the small output instead of a NaN guard over the scores.

Assumes a causal model (the model mask never allows k > q) and a prefill
(query and key lengths equal); the KV-cache path is routed elsewhere
(:mod:`blindsight.passes.lowering`).
"""

from blindsight.passes.lowering.fast.plan import build_fast, route_of

__all__ = ["build_fast", "route_of"]
