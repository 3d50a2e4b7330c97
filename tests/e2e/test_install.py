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


def test_a_wheel_from_the_clone_carries_the_config_tree(tmp_path):
    # `pip install .` from a clone: the wheel holds the packages and the packaged config tree, so
    # concept-shard composes the example configuration outside the repository. The new venv sees
    # the test venv's third-party packages (a path line), not its editable install of this repo.
    import site
    import sys

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(wheels.glob("concept_pretrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(target) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, str(wheel)], check=True
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONCEPT_CONF_DIR")}
    (tmp_path / "proj" / "data").mkdir(parents=True)  # a new project: no conf/ of its own
    shown = subprocess.run(
        [
            python,
            "-c",
            "import concept_shard, sys; from concept_shard.config import PACKAGED_CONF_DIR as d; "
            "print(concept_shard.__file__); print(d); sys.argv = ['concept-shard', 'build', 'proj', '--cfg', 'job']; "
            "from concept_shard.cli import main; sys.exit(main())",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    module, conf, *config = shown.stdout.splitlines()
    assert module.startswith(target) and conf.startswith(target)  # the wheel's, not the repository's
    assert any(line.startswith("datamodule:") for line in config) and any("dim_model" in line for line in config)
