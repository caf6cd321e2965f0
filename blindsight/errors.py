"""User-facing errors: each carries one line that says what is wrong and how to fix it."""


class BlindSightError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits non-zero."""


class SpanError(BlindSightError, ValueError):
    """Image spans that break SPEC §2 (sorted, non-overlapping, non-empty, in range)."""


class ProfileError(BlindSightError, ValueError):
    """A head profile that breaks SPEC §3."""


class ModelError(BlindSightError, ValueError):
    """An ONNX model the compiler cannot take (missing, corrupt, no attention, already compiled)."""


def run_cli(prog: str, action, debug: bool = False):
    """Run a command's work: (0, result), or one line on stderr and (2, None) for a
    user error, (1, None) for anything else (a traceback only with --debug)."""
    import sys

    try:
        return 0, action()
    except BlindSightError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2, None
    except Exception as exc:  # one line, not a traceback, unless asked
        if debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1, None
