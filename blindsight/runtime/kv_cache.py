"""The KV cache of one answer, in buffers ONNX Runtime writes into directly.

The exported language model returns its cache as ``present.{i}.{key,value}`` =
Concat(past, new tokens) ([B, kv_heads, S, head_dim]), a fresh tensor at every
call. Left to ONNX Runtime, each of those tensors is a new allocation: at
Qwen2-VL-2B's size after 16K tokens, 56 tensors of 17 MB, every page of them
faulted in and zeroed by the kernel at every decode step, then unmapped: most
of a step's time at that length (docs/runtime.md, "The KV cache in decode").

:class:`KVBuffers` keeps two flat buffers per cache tensor, long enough for
the whole answer (prompt and new tokens). A call reads its past from the
prefix of one and, through an IOBinding, ONNX Runtime's Concat writes the
present straight into the prefix of the other; the next call swaps them. The
prefix of a flat buffer is a contiguous [1, kv_heads, S, head_dim] tensor for
any S, so no copy is made outside the graph. The pages are touched once, as
the cache grows. A call holds its past and its present, as a plain run does;
between calls both buffers stay resident (a plain run had freed the past).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

PAST = "past_key_values.{}"
PRESENT = "present.{}"


def cache_names(num_layers: int) -> list[str]:
    """``{layer}.{key|value}`` for every layer, as the export names its cache."""
    return [f"{i}.{n}" for i in range(num_layers) for n in ("key", "value")]


class KVBuffers:
    """Ping-pong cache buffers for ``names`` (see :func:`cache_names`) of
    ``capacity`` tokens; ``length`` tokens are held. A call longer than the
    capacity grows both buffers (a copy), so the capacity is a hint, not a limit."""

    def __init__(self, names: list[str], kv_heads: int, head_dim: int, capacity: int, dtype):
        self.names = list(names)
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._current = 0
        self._allocate(max(int(capacity), 1))

    def _allocate(self, capacity: int) -> None:
        size = self.kv_heads * capacity * self.head_dim
        # np.empty: pages become resident as the cache reaches them, not now
        self._buffers = [{n: np.empty(size, self.dtype) for n in self.names} for _ in range(2)]
        self.capacity = capacity

    def _view(self, which: int, name: str, length: int) -> np.ndarray:
        flat = self._buffers[which][name][: self.kv_heads * length * self.head_dim]
        return flat.reshape(1, self.kv_heads, length, self.head_dim)

    def past(self) -> dict[str, np.ndarray]:
        """The cache held, as the next call's ``past_key_values.*`` (views, not copies)."""
        return {PAST.format(n): self._view(self._current, n, self.length) for n in self.names}

    def load(self, past: dict[str, np.ndarray]) -> None:
        """Start from a cache given as ``past_key_values.*`` arrays (copied in)."""
        length = int(next(iter(past.values())).shape[2]) if past else 0
        if length > self.capacity:
            self._allocate(length)
        for n in self.names:
            self._view(self._current, n, length)[...] = past[PAST.format(n)]
        self.length = length

    def bind(self, binding: ort.IOBinding, new: int) -> None:
        """Bind the past (the current buffers) and the present (``new`` tokens
        longer, in the other buffers) of the next call."""
        if self.length + new > self.capacity:
            held = self.past()  # views that keep the old buffers alive until loaded
            self._allocate(max(self.length + new, 2 * self.capacity))
            self.load(held)
        for n in self.names:
            binding.bind_ortvalue_input(PAST.format(n), ort.OrtValue.ortvalue_from_numpy(
                self._view(self._current, n, self.length)))
            binding.bind_ortvalue_output(PRESENT.format(n), ort.OrtValue.ortvalue_from_numpy(
                self._view(1 - self._current, n, self.length + new)))

    def advance(self, new: int) -> None:
        """After the call ran: its present becomes the cache held."""
        self._current = 1 - self._current
        self.length += new


def run_with_cache(sess: ort.InferenceSession, feeds: dict, cache: KVBuffers, new: int) -> dict[str, np.ndarray]:
    """One call of ``sess`` adding ``new`` tokens to ``cache``: ``feeds`` are the
    inputs other than the cache; returns the outputs other than the cache, by name."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    # bound first, so that get_outputs() (in binding order) starts with them
    others = [o.name for o in sess.get_outputs() if not o.name.startswith("present.")]
    for name in others:
        binding.bind_output(name, "cpu")
    cache.bind(binding, new)
    sess.run_with_iobinding(binding)
    values = binding.get_outputs()
    cache.advance(new)
    return {name: values[i].numpy() for i, name in enumerate(others)}
