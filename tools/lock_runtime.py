"""Write the runtime locks, requirements-runtime-py3.X.lock: what `pip install '.[eval]'` needs on each
Python version, pinned to the versions of the full (test) lock requirements-py3.X.lock, so that a
lean install (`make install LEAN=1`) runs exactly the code the suite tests, without pytest, moto,
lamindb, wandb and their ~100 dependencies.

    .venv/bin/python tools/lock_runtime.py        # after a change of pyproject.toml's dependencies

Each version's own pip works out the closure of the project's wheel (a dry run: nothing is
installed; the package index is asked for metadata only) with the full lock as constraints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("3.11", "3.12", "3.13")
HEADER = """\
# The runtime environment for Python {v}: what `pip install .` needs, pinned to the versions of
# requirements-py{v}.lock (the full environment the suite runs in). `make install LEAN=1` installs it.
# Written by tools/lock_runtime.py; regenerate it with the full locks.
"""


def closure(wheel: Path, version: str, tmp: Path) -> dict[str, str]:
    """The wheel's dependencies on `version`, resolved by that version's own pip (environment
    markers are evaluated against the running interpreter: pip's --python-version does not)."""
    find = subprocess.run(
        ["bash", str(ROOT / "tools" / "install.sh"), "--print-python"],
        env={**os.environ, "PYTHON": version},
        capture_output=True,
        text=True,
        check=True,
    )
    report = tmp / f"report-{version}.json"
    lock = ROOT / f"requirements-py{version}.lock"
    resolve = ["-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    # with the eval extra: make demo (the lean install's main job) ends with concept-eval
    subprocess.run([find.stdout.strip(), *resolve, "-c", str(lock), f"{wheel}[eval]"], check=True)
    pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    pins.pop("concept-pretrain", None)
    return pins


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp)]
        subprocess.run([*build, str(ROOT)], check=True)
        wheel = next(tmp.glob("concept_pretrain-*.whl"))
        for v in VERSIONS:
            pins = closure(wheel, v, tmp)
            lines = [f"{name}=={pins[name]}" for name in sorted(pins, key=str.lower)]
            out = ROOT / f"requirements-runtime-py{v}.lock"
            out.write_text(HEADER.format(v=v) + "\n".join(lines) + "\n")
            print(f"{out.name}: {len(lines)} packages")


if __name__ == "__main__":
    main()
