"""The fenced code blocks of README.md and docs/*.md, for the tests that run or check them
(tests/e2e/test_docs.py says what checks each one; test_readme.py and test_lamin.py run some as
written). A block is named by its file and its first line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", flags=re.S | re.M)


class Block(NamedTuple):
    file: str  # relative to the repository
    line: int  # of the opening fence
    lang: str  # "bash", "python", "yaml" or "" (text)
    text: str

    @property
    def head(self) -> str:
        """Its first non-empty line (what names it)."""
        return next(line.strip() for line in self.text.splitlines() if line.strip())

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.head[:60]})"


def blocks(files=DOCS) -> list[Block]:
    out = []
    for name in files:
        text = (ROOT / name).read_text()
        for m in _FENCE.finditer(text):
            out.append(Block(name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return out


def block(file: str, marker: str) -> Block:
    """The one block of `file` that holds `marker`."""
    found = [b for b in blocks([file]) if marker in b.text]
    assert len(found) == 1, f"{file}: {len(found)} code blocks hold {marker!r} (tests/doc_blocks.py)"
    return found[0]


def replaced(text: str, pairs) -> str:
    """`text` with each (what the docs say, what the test runs) replaced; a pair whose first part
    is no longer in the text fails, naming it, so a changed block is seen."""
    for said, run in pairs:
        assert said in text, f"the docs no longer say {said!r}: update the test that runs this block"
        text = text.replace(said, run)
    return text


def layout_paths(text: str, roots: dict[str, str]) -> list[str]:
    """The paths a layout drawing lists: the first column of each line (before two spaces), its
    names split at commas, a name under the directory it is indented below; the prefixes of
    `roots` replaced. Lines that say the path is optional, transient or drawn below are left out."""
    out: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        if not line.strip() or re.search(r"optional|being written|flock|\(below\)", line):
            continue
        indent = len(line) - len(line.lstrip())
        column = re.split(r" {2,}", line.strip())[0]
        column = re.split(r" \(|: ", column)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent and not stack:  # the description of the line above, continued
            continue
        parent = stack[-1][1] if stack else ""
        first = ""
        for name in (n.strip(" ,;:") for n in column.split(", ")):
            # `a/b/index.json, datasets.json`: the names after the first lie beside it
            path = parent + name if not first else first.rsplit("/", 1)[0] + "/" + name if "/" in first else name
            first = first or path
            for root, replacement in roots.items():
                path = replacement + path[len(root) :] if path.startswith(root) else path
            if name.endswith("/"):
                stack.append((indent, path))
            if path:
                out.append(path)
    return out


def missing_paths(paths: list[str], base: Path) -> list[str]:
    """Those of `paths` that `base` lacks (<name> and NNNNN match any name)."""
    return [p for p in paths if not any(base.glob(re.sub(r"<[^>]+>|N{2,}", "*", p).rstrip("/")))]
