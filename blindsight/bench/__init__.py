"""Benchmarks and FLOP accounting (bs-bench, bs-flops)."""
