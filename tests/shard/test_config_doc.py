"""docs/config.md documents every key of the composed config, with the defaults of `conf/`.

Per-entry keys are documented by pattern: a split file mounted at `datamodule.split_<x>` and a
validation loader `<name>` under `datamodule.dataset.val` / `datamodule.dataloader.val` are
written `datamodule.split_<source>_<species>.<key>` and `datamodule.dataset.val.<loader>.<key>`.
"""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO
from omegaconf import OmegaConf

from concept_shard.config import compose_tree

DOC = REPO / "docs" / "config.md"
# name -> (overrides, the labels whose values the page gives as "(Tiny `x`, demo `y`)", most specific first)
COMPOSITIONS = {
    "Basic": (["datamodule=DataModuleBasic", "model=ContrastiveModel"], []),
    "Advanced": (["datamodule=DataModuleAdvanced", "model=ContrastiveModel"], []),
    "Tiny": (["model=ContrastiveModelTiny"], ["Tiny"]),
    "demo": (["+experiment=demo"], ["demo", "Tiny"]),
}
PATTERNS = [
    (re.compile(r"^datamodule\.split_[^.]+(\.|$)"), "datamodule.split_<source>_<species>\\1"),
    (re.compile(r"^datamodule\.(dataset|dataloader)\.val\.[^.]+(\.|$)"), "datamodule.\\1.val.<loader>\\2"),
]


def leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf; a list is a leaf (split lists, species, obs_keys)."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def documented_name(key: str) -> str:
    for pattern, replacement in PATTERNS:
        key = pattern.sub(replacement, key)
    return key


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[str, tuple[dict[str, object], list[str]]]:
    project = tmp_path_factory.mktemp("project")  # composing reads no file of the project
    return {
        name: (leaves(OmegaConf.to_container(compose_tree(project, ov), resolve=False)), labels)
        for name, (ov, labels) in COMPOSITIONS.items()
    }


@pytest.fixture(scope="module")
def doc_rows() -> dict[str, str]:
    """Documented key -> its default cell, from table rows `| `key` | default | ...`."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|", line)
        if m:
            rows.setdefault(m.group(1), m.group(2))
    return rows


def test_every_composed_key_is_documented(composed, doc_rows):
    missing = sorted({documented_name(k) for keys, _ in composed.values() for k in keys} - doc_rows.keys())
    assert not missing, f"keys of the composed config missing from {DOC.name}: {missing}"


def test_documented_defaults_match_conf(composed, doc_rows):
    """A default cell that starts with a literal (`512`, `zstd:1`, `null`) must equal the composed
    value, and `Tiny `x`` / `demo `x`` in it the value under `model=ContrastiveModelTiny` /
    `+experiment=demo`; cells such as `Basic: ...` or `required (...)` are prose, not checked."""
    wrong = []
    for name, (keys, labels) in composed.items():
        for key, value in keys.items():
            cell = doc_rows.get(key) or ""  # pattern keys (per split / loader) are not checked
            m = re.match(r"^`([^`]*)`", cell)
            if not m:
                continue
            literal = m.group(1)
            for label in labels:
                if v := re.search(rf"\b{label} `([^`]*)`", cell):
                    literal = v.group(1)
                    break
            if yaml.safe_load(literal) != value:
                wrong.append(f"{key} ({name}): documented {literal!r}, conf has {value!r}")
    assert not wrong, f"{DOC.name} disagrees with conf/: {sorted(set(wrong))}"
