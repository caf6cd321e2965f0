"""Paths in JSON records and reports (bs-eval, bs-profile, bs-bench) that mean the same on
every machine: never an absolute home path.

- under the BlindSight cache (``$BLINDSIGHT_CACHE``, default ``~/.cache/blindsight``):
  ``<cache>/REL``;
- under ``base`` (default: the working directory): relative to it;
- under the home directory: ``~/REL``;
- anything else is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = "<cache>"


def cache_root() -> Path:
    """The BlindSight cache: ``$BLINDSIGHT_CACHE``, default ``~/.cache/blindsight``."""
    return Path(os.environ.get("BLINDSIGHT_CACHE", Path.home() / ".cache" / "blindsight"))


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def record_path(path, base=None) -> str:
    """``path`` as a record should name it (see the module's rules)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    for root, prefix in ((cache_root(), CACHE + "/"), (Path(base or os.getcwd()), ""), (Path.home(), "~/")):
        rel = _relative(p, Path(os.path.abspath(root)))
        if rel is not None and (prefix or rel != "."):
            return prefix + rel
    return str(p)


def scrub(text: str) -> str:
    """A free-text field (a model's description naming its directory) without home paths."""
    for root, label in ((cache_root(), CACHE), (Path.home(), "~")):
        root = os.path.abspath(root)
        if len(root) > 1:
            text = text.replace(root, label)
    return text
