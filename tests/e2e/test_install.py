"""tools/install.sh: what a new user's first command does before pip starts."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_too_little_disk_is_said_before_pip_starts(tmp_path):
    # a venv of torch with its CUDA libraries is ~8 GB: a disk short of that gets one clear line
    # (where, how much, what to do) instead of pip's "No space left on device" halfway through
    venv = tmp_path / "venv"
    env = dict(os.environ, CONCEPT_VENV=str(venv), CONCEPT_INSTALL_MIN_FREE_GB="1000000")
    env.pop("PYTHON", None)
    done = subprocess.run(["bash", "tools/install.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "needs about 1000000 GB free" in done.stderr
    assert str(tmp_path) in done.stderr and "CONCEPT_VENV" in done.stderr
    assert not venv.exists()
