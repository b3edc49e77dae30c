"""The docs hold together: links and anchors resolve, metric names are real, every page
is reachable from a README that stays short."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from loraplex.training.config import config_keys
from tests.unit.deploy_support import router_metric_names
from tests.unit.docs_markdown import ROOT, anchors, blocks, doc_pages, links

README = ROOT / "README.md"
README_MAX_LINES = 200
_METRIC = re.compile(r"\bloraplex_[a-z0-9_]*[a-z0-9](?:_\*)?")
_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    return broken


def test_links_and_anchors_resolve():
    broken = [
        f"{page.relative_to(ROOT)}: {problem}"
        for page in doc_pages()
        for problem in _broken_links(page)
    ]
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_missing_page_and_anchor(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A `stock` vLLM server\n\n[a](#a-stock-vllm-server) [b](#nope)"
        " [c](missing.md) `[d](missing-too.md)`\n"
    )
    assert _broken_links(page) == [
        "#nope: no heading with anchor #nope",
        "missing.md: no such file",
    ]


def _exported(name: str, exported: frozenset[str]) -> bool:
    if name.endswith("_*"):  # `loraplex_engine_*`: a family of metrics
        return any(series.startswith(name[:-1]) for series in exported)
    return any(name + suffix in exported for suffix in _SUFFIXES)


def test_metric_names_in_the_docs_are_ones_the_router_exports():
    exported = router_metric_names()
    unknown = {
        f"{page.relative_to(ROOT)}: {name}"
        for page in doc_pages()
        for name in _METRIC.findall(page.read_text())
        if not _exported(name, exported)
    }
    assert not unknown, "\n".join(sorted(unknown))


def _flat_keys(mapping: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_python_and_yaml_blocks_parse_and_train_configs_use_real_keys():
    """The SDK snippets are Python, and a train.yaml shown in the docs has only keys
    `loraplex train` knows (a renamed config key fails here)."""
    known = set(config_keys())
    for page in doc_pages():
        for block in blocks(page):
            if block.language == "python":
                ast.parse(block.text, filename=block.where)
            elif block.language == "yaml":
                data = yaml.safe_load(block.text)
                if isinstance(data, dict) and "train_data" in data:
                    unknown = _flat_keys(data) - known
                    assert not unknown, f"{block.where}: not TrainConfig keys: {unknown}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not missing, f"README.md links no {missing}"


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"
