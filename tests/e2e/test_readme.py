"""The README's walk-through ("From an empty directory to a trained model"), run as written by a
new user: its bash block, extracted from README.md, in a shell, so that the commands, flags, paths
and YAML it shows cannot drift from what the programs accept; then its Python API block, on the
walk-through's project and run (its `train()` calls take 2 steps instead of 200 and 300, its
embeddings keep 200 genes a cell, its `evaluate()` draws no UMAP).

Only sizes change, to keep the suite short: the example's files are made with 150 cells each, the
runs take 6 and then 8 steps instead of 300 and 400 (validation every 3 instead of 100), whole cells
keep 200 genes instead of 1,000 (validation, embeddings, scores), and concept-eval scores 400 cells
without the UMAP picture. Every command runs, concept-eval included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from doc_blocks import block, layout_paths, missing_paths, replaced

ROOT = Path(__file__).resolve().parents[2]
SIZES = [  # (what the README says, what the test runs)
    ("make_example_project.py /tmp/example", "make_example_project.py /tmp/example --cells 150"),
    ("model.training.max_steps=300", "model.training.max_steps=6"),
    ("model.training.max_steps=400", "model.training.max_steps=8"),
    ("model.training.val_check_interval=100", "model.training.val_check_interval=3"),
    (
        "concept-eval $P/model_checkpoints/first",
        "concept-eval $P/model_checkpoints/first --max-cells 400 --no-umap --max-tokens 200",
    ),
    # whole cells of 200 genes instead of 1,000 (validation, concept-embed, concept-eval): the tiny model's
    # attention over 1,000 tokens was most of these programs' time
    ("      max_tokens: 1000\n", "      max_tokens: 200\n"),
    ("--out $P/hs_val_e.embedded.h5ad", "--out $P/hs_val_e.embedded.h5ad --max-tokens 200"),
]


def walkthrough() -> str:
    return block("README.md", "# 1. A project directory").text


API_SIZES = [  # and its evaluate() without the UMAP picture, whole cells of 200 genes, as the walk-through's
    ("steps=200", "steps=2"),
    ("steps=300", "steps=2"),
    ('batch_key="donor_id")', 'batch_key="donor_id", umap=False, max_tokens=200)'),
    ("z = embed(adata, model)", "z = embed(adata, model, max_tokens=200)"),
    ('"big.embedded.h5ad")', '"big.embedded.h5ad", max_tokens=200)'),
    ('key_added="X_concept_tuned")', 'key_added="X_concept_tuned", max_tokens=200)'),
]


def python_api() -> str:
    """The README's Python API block (the one that imports concept_train's functions)."""
    return block("README.md", 'load_model("PROJECT').text


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    script = walkthrough()
    script = replaced(script, SIZES)
    # its own directories instead of /tmp/example and /tmp/myproject
    script = script.replace("/tmp/example", str(tmp_path / "example")).replace("/tmp/myproject", str(tmp_path / "p"))
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    p = tmp_path / "p"
    run = p / "model_checkpoints" / "first"
    assert (run / "checkpoints" / "step_8").is_dir() and (run / "curves.png").is_file()
    # the run directory as docs/design.md draws it
    drawing = block("docs/design.md", "PATH.CHECKPOINT_ROOT/<run_id>/").text
    paths = layout_paths(drawing, {"PATH.CHECKPOINT_ROOT/<run_id>/": ""})
    assert len(paths) >= 10 and not missing_paths(paths, run), paths
    assert "resumed run first" in done.stdout + done.stderr
    embedded = ad.read_h5ad(p / "hs_val_e.embedded.h5ad")
    assert embedded.obsm["X_concept"].shape[0] == embedded.n_obs
    report = (run / "eval" / "report.md").read_text()
    assert "| pca |" in report and "kNN cell_type" in report and "umap.png" not in report  # --no-umap
    assert "no effect here" not in done.stderr  # the README's own files cause no warning

    # then its Python API block, on the walk-through's project and run, in a directory holding the
    # files it names (copies of the project's)
    code = python_api()
    code = replaced(code, API_SIZES)
    code = code.replace("PROJECT/", f"{p}/")
    here = tmp_path / "api"
    here.mkdir()
    files = p / "data" / "mylab" / "h5ads"
    for name, source in [("cells", "hs_val_e"), ("big", "hs_blood_a"), ("more_cells", "hs_blood_a")]:
        shutil.copyfile(files / f"{source}.h5ad", here / f"{name}.h5ad")
    for name, source in [("a", "hs_blood_a"), ("b", "hs_val_e")]:
        shutil.copyfile(files / f"{source}.h5ad", here / f"{name}.h5ad")
    code += "\nprint('MI', mi, 'SCORES', sorted(scores))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "MI " in done.stdout and (here / "big.embedded.h5ad").is_file() and (here / "eval" / "report.md").is_file()
