"""The repository speaks to its users: every citation points into the repository
(docs/specification.md, README, docs/), and no development bookkeeping (tracker
or work-session numbers, paths outside the checkout) is left in any tracked file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "specification.md"

# spelled in pieces so that this file does not match itself
FORBIDDEN = {
    "a citation of the design contract outside the repository": re.compile("SP" + "EC §"),
    "a path outside the checkout": re.compile(r"\.\./" + "shared"),
    "a tracker or work-session number": re.compile(r"\b(" + "[Ii]ss" + "ue|[Ss]t" + r"op)s? #?\d+"),
}
# binary or generated files: nothing to read
SKIP_SUFFIXES = {".png", ".onnx", ".data", ".bin", ".so", ".gguf", ".safetensors", ".npz", ".npy"}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_citation_outside_the_repository_and_no_bookkeeping():
    bad = []
    for path in _tracked_files():
        if path.suffix in SKIP_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_section_citation_names_a_section_of_the_specification():
    headings = re.findall(r"^## (\d+)\. (.+)$", SPEC.read_text(), flags=re.M)
    sections = {int(n) for n, _ in headings}
    anchors = {_anchor(f"{n}. {title}") for n, title in headings}
    assert sections == set(range(1, 7)), sorted(sections)
    cited = re.compile(r"specification(?:\.md)?(?:#([\w\-]+))?\)?,? §(\d+)")
    link = re.compile(r"specification\.md#([\w\-]+)")
    for path in _tracked_files():
        if path.suffix not in {".py", ".md", ".cc", ".h", ".toml"} or not path.is_file():
            continue
        text = path.read_text()
        for _, number in cited.findall(text):
            assert int(number) in sections, f"{path.relative_to(ROOT)} cites specification §{number}"
        for anchor in link.findall(text):
            assert anchor in anchors, f"{path.relative_to(ROOT)} links a missing section #{anchor}"
