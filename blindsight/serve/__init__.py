"""bs-serve: an OpenAI-compatible HTTP endpoint for a bs-export directory.

- :mod:`blindsight.serve.protocol`: the request schema (OpenAI chat completions,
  image content parts) and its validation, every fault one :class:`ApiError`.
- :mod:`blindsight.serve.engine`: one loaded :class:`~blindsight.runtime.pipeline.Pipeline`
  shared by all requests, a bounded queue (429 when full), streaming through the
  pipeline's ``on_token`` callback, cancellation when a client goes away, the
  per-request attention FLOPs saved.
- :mod:`blindsight.serve.app`: the FastAPI application (``/v1/chat/completions``,
  ``/v1/models``, ``/health``, ``/metrics``).
- :mod:`blindsight.serve.cli`: ``bs-serve``; :mod:`blindsight.serve.load`: ``bs-serve-load``;
  :mod:`blindsight.serve.ray_app`: ``bs-serve-ray``; :mod:`blindsight.serve.triton`: ``bs-serve-triton``.
"""
