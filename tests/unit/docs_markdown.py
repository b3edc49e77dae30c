"""Reading the docs for the docs tests: pages, fenced blocks, the blocks marked to run,
the commands in a block, the code spans of a page, headings and links.

A block runs when the line before its fence is the marker `<!-- docs-test: run -->`
(docs/testing.md, "The docs test"). ```console blocks hold `$ command` lines followed by
the output they must print; ```bash blocks hold commands that must exit 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_MARKER = "<!-- docs-test: run -->"
PROMPT = "$ "

_FENCE = re.compile(r"^(\s*)(```+)\s*([\w-]*)\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_pages() -> list[Path]:
    """README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    text: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order (indented fences in lists included)."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        previous = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        found.append(Block(page, i + 1, language, "\n".join(body) + "\n", previous == RUN_MARKER))
        i = j + 1
    return found


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    kept, inside, fence = [], False, ""
    for line in page.read_text().splitlines():
        opening = _FENCE.match(line)
        if not inside and opening:
            inside, fence = True, opening.group(2)
        elif inside and line.strip() == fence:
            inside = False
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


SHELL_LANGUAGES = ("bash", "console", "sh", "shell")


def shell_texts(page: Path) -> list[str]:
    """The code on a page that may hold commands: its shell blocks and inline code spans
    (not diagrams, YAML or Python)."""
    spans = [m.group(2) for m in _INLINE_CODE.finditer(prose(page))]
    return [b.text for b in blocks(page) if b.language in SHELL_LANGUAGES] + spans


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


@dataclass
class Step:
    command: str
    expected: str | None = None
    """What a console block shows after the command; None for bash blocks (not checked)."""


def steps(block: Block) -> list[Step]:
    """The commands of a run block, with the output each must print (console blocks)."""
    if block.language == "console":
        found: list[Step] = []
        lines = block.text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.startswith(PROMPT):
                raise ValueError(f"{block.where}: output before any `$ ` command: {line!r}")
            command = line[len(PROMPT) :]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            output: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].startswith(PROMPT):
                output.append(lines[i])
                i += 1
            found.append(Step(command, "".join(o + "\n" for o in output)))
        return found
    if block.language in SHELL_LANGUAGES:
        return [
            Step(line) for line in logical_lines(block.text) if line.strip() and not _comment(line)
        ]
    raise ValueError(f"{block.where}: a run block must be ```console or ```bash")


def _comment(line: str) -> bool:
    return line.lstrip().startswith("#")


@dataclass
class Heading:
    level: int
    text: str
    anchors: list[str] = field(default_factory=list)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings (`## A stock vLLM server` → `a-stock-vllm-server`)."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose(page).splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        # Emphasis marks go, but an underscore inside a code span stays (as on GitHub).
        parts = match.group(2).split("`")
        heading = "".join(p if i % 2 else p.replace("_", "") for i, p in enumerate(parts))
        text = re.sub(r"[*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path) -> list[str]:
    """Link targets in the page's prose (code spans are not links)."""
    text = _INLINE_CODE.sub("", prose(page))
    return [m.group(2) for m in _LINK.finditer(text)]
