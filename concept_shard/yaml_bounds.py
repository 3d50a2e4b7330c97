"""Bounds a YAML file is held to before it is parsed for real: its size, its nesting and its node
count with every alias expanded. PyYAML and OmegaConf recurse per level and expand aliases
eagerly: a 4.8 KB alias bomb ran for minutes, and a file nested 100,000 deep ended in a raw
RecursionError. A run's config.yaml (checkpoint.py) and a project's own conf/ files (config.py,
when Hydra fails on one) are checked here; each caller turns a problem into its own error."""

from __future__ import annotations

from pathlib import Path

MAX_YAML_BYTES = 4 << 20
MAX_YAML_NODES = 100_000  # counted with every alias expanded
MAX_YAML_DEPTH = 64


def yaml_problem(path: Path, what: str = "a config") -> str | None:
    """None when the file at `path` is valid YAML within the bounds; else what is wrong with it,
    as the middle of an error message ("is nested deeper than 64 ...")."""
    import yaml

    data = Path(path).read_bytes()
    if len(data) > MAX_YAML_BYTES:
        return f"is {len(data):,} bytes, more than {what} ever holds."
    try:
        root = yaml.compose(data, Loader=yaml.SafeLoader)
    except RecursionError:
        return f"is nested too deep to be {what}."
    except yaml.YAMLError as exc:
        return f"is not valid YAML ({' '.join(str(exc).split())})."
    stack, seen = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if depth > MAX_YAML_DEPTH:
            return f"is nested deeper than {MAX_YAML_DEPTH} (aliases expanded): not {what}."
        if seen > MAX_YAML_NODES:
            return f"is over {MAX_YAML_NODES:,} nodes (aliases expanded): not {what}."
        if isinstance(node, yaml.MappingNode):
            stack.extend((item, depth + 1) for pair in node.value for item in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)
    return None
