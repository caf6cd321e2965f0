"""User-facing errors: each carries one line that says what is wrong and how to fix it."""


class BlindSightError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits non-zero."""


class SpanError(BlindSightError, ValueError):
    """Image spans that break SPEC §2 (sorted, non-overlapping, non-empty, in range)."""


class ProfileError(BlindSightError, ValueError):
    """A head profile that breaks SPEC §3."""


class ModelError(BlindSightError, ValueError):
    """An ONNX model the compiler cannot take (missing, corrupt, no attention, already compiled)."""
