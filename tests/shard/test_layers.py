"""The layers hold: `concept_config` (the schema) imports none of our packages, `concept_shard`
imports nothing of `concept_train`, and neither loads torch. A sharding array task or
`concept-shard status` pays neither torch's start-up (~6 s) nor its memory (~700 MB)."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ADVANCED, REPO


def _imports(package: str) -> dict[str, set[str]]:
    """Module file -> the top-level packages it imports (absolute imports; relative ones stay inside)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


def test_lower_layers_import_no_upper_one():
    for path, names in _imports("concept_shard").items():
        assert not names & {"concept_train", "torch"}, f"{path} imports {names & {'concept_train', 'torch'}}"
    for path, names in _imports("concept_config").items():
        assert not names & {"concept_shard", "concept_train", "torch", "numpy", "omegaconf"}, path


def test_concept_shard_status_leaves_torch_out(example_source):
    script = (
        "import sys\n"
        "from concept_shard.cli import main\n"
        f"code = main(['status', {str(example_source)!r}, *{ADVANCED!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'concept_train', 'streaming'))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(code if heavy == [] else 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 1  # the example is not sharded: every file pending (exit 1), none failed
