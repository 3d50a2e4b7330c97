"""concept-eval: the scIB metrics bound the model between a perfect and a random embedding, the
files it writes, and its errors for keys and species."""

from __future__ import annotations

import json
import re
import shutil
import sys

import anndata as ad
import numpy as np
import pytest

from concept_shard.errors import UserError
from concept_train.cli import main as train_main
from concept_train.eval import evaluate
from concept_train.eval.cli import main as eval_main
from concept_train.eval.scib import BATCH, BIO, TOTAL, scib_scores

TINY = [
    "model.dim_model=16",
    "model.nlayers=1",
    "model.num_head=2",
    "model.dim_hid=32",
    "model.dim_gene_embs=16",
    "model.training.max_steps=20",
    "model.training.warmup=2",
    "model.training.val_check_interval=0",
    "model.training.validate_before_training=False",
    "datamodule.dataloader.train.batch_size=32",
    "datamodule.dataloader.train.num_workers=0",
    "datamodule=DataModuleAdvanced",
]
HUMAN = "data/synth_hsapiens/h5ads/hs_val_e.h5ad"
MOUSE = "data/synth_mmusculus/h5ads/mm_val_c.h5ad"


@pytest.fixture(scope="module")
def trained_run(sharded_example, tmp_path_factory):
    """One small run for the module's tests (they only read it)."""
    project = tmp_path_factory.mktemp("eval") / "project"
    shutil.copytree(sharded_example, project, symlinks=True)
    assert train_main([str(project), *TINY, "initialize.run_id=ev"]) == 0
    return project, project / "model_checkpoints" / "ev"


@pytest.mark.slow
def test_model_is_bounded_by_a_perfect_and_a_random_embedding(trained_run, tmp_path):
    project, run = trained_run
    cells = ad.read_h5ad(project / HUMAN)  # every cell has counts: all kept, in file order
    n = cells.n_obs
    out = tmp_path / "eval"
    assert eval_main([str(run), str(project / HUMAN), "--out", str(out), "--panels", "200,800"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cells"]["evaluated"] == n >= 256 and metrics["cells"]["species"] == "hsapiens"
    model, pca = metrics["scib"]["concept"], metrics["scib"]["pca"]
    labels, batches = cells.obs["cell_type"].astype(str).to_numpy(), cells.obs["donor_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    kinds = np.unique(labels, return_inverse=True)[1]
    perfect = scib_scores(np.eye(16)[kinds] + rng.normal(0, 1e-3, (len(labels), 16)), labels, batches)
    random = scib_scores(rng.normal(size=(len(labels), 16)), labels, batches)
    # a random embedding mixes batches perfectly: it bounds bio conservation from below, not the
    # batch correction (nor so the total); the perfect one (labels apart, batches mixed) bounds all
    for scores in (model, pca):
        assert random[BIO] < scores[BIO] <= perfect[BIO]
        assert scores[BATCH] <= perfect[BATCH] and scores[TOTAL] <= perfect[TOTAL]
    assert perfect[BIO] > 0.9 and random[BIO] < 0.5

    # the files, each embedding a row of scib.csv; kNN for every label-like obs key; recall vs chance
    rows = (out / "scib.csv").read_text().splitlines()
    assert rows[0].startswith("Embedding,Isolated labels") and [r.split(",")[0] for r in rows[1:]] == ["concept", "pca"]
    assert set(metrics["knn"]["concept"]) >= {"cell_type", "donor_id"} and "dataset" not in metrics["knn"]["concept"]
    for size in ("200", "800"):
        r = metrics["recall"][size]
        assert r["cells"] == n and r["chance"] == pytest.approx(-(-n // 256) / n) and 0 <= r["recall@1"] <= 1
    assert (out / "umap.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| concept |" in report and "| pca |" in report
    assert not list(out.glob(".*tmp"))


def refused(call, pattern: str) -> None:
    """`call()` raises a UserError whose message (its line breaks undone) matches `pattern`."""
    with pytest.raises(UserError) as err:
        call()
    assert re.search(pattern, " ".join(str(err.value).split())), str(err.value)


def test_missing_keys_name_the_key_and_list_the_obs_columns(trained_run):
    project, run = trained_run
    refused(
        lambda: evaluate(run, [project / HUMAN], label_key="celltype"),
        r"hs_val_e.h5ad: has no obs column 'celltype' \(--label-key\); its obs columns are \['cell_type', "
        r"'dataset', 'donor_id', 'tissue'\]\. Pass one of them with --label-key",
    )
    refused(lambda: evaluate(run, [project / HUMAN], batch_key="batch"), r"no obs column 'batch' \(--batch-key\)")
    # the validation shards (no inputs): the same check, from dataset.json
    refused(
        lambda: evaluate(run, batch_key="batch"),
        r"\(shards .*\): has no obs column 'batch' \(--batch-key\).*'donor_id'",
    )


def test_cells_of_the_other_species_are_refused(trained_run, tmp_path, capsys):
    project, run = trained_run
    assert eval_main([str(run), str(project / HUMAN), str(project / MOUSE), "--out", str(tmp_path / "e")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "mm_val_c.h5ad" in err and "mmusculus cells" in err and "one concept-eval per species" in err
    refused(
        lambda: evaluate(run, [project / HUMAN], species="mmusculus"), "shares no gene id with the mmusculus vocabulary"
    )
    refused(lambda: evaluate(run, [project / HUMAN], species="drosophila"), "--species.*was not trained on")
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_a_batch_key_with_one_value_is_refused(trained_run):
    project, run = trained_run
    refused(
        lambda: evaluate(run, [project / HUMAN], batch_key="dataset", max_cells=300),
        r"--batch-key dataset: has 1 distinct value\(s\) \['hs_val_e'\]",
    )


def test_without_a_batch_key_it_picks_one_or_reports_batch_metrics_as_not_applicable(trained_run, tmp_path):
    """concept-eval on the walk-through's run failed: donor_id had one value among its cells, and the
    error proposed the label column as the batch key."""
    project, run = trained_run
    cells = ad.read_h5ad(project / HUMAN)[:160].copy()
    cells.obs["donor_id"] = "d1"
    cells.obs["batch"] = np.where(np.arange(cells.n_obs) % 2, "b1", "b2")
    picked = tmp_path / "picked.h5ad"
    cells.write_h5ad(picked)
    lines = []
    quick = dict(max_cells=160, panel_sizes=[], umap=False, log=lines.append)
    result = evaluate(run, [picked], **quick)  # donor_id has one value: the next key that varies
    assert result["settings"]["batch_key"] == "batch" and any("batch key: batch" in line for line in lines)
    assert result["scib"]["concept"]["Total"] is not None
    for key in cells.obs.columns.drop("cell_type"):
        cells.obs[key] = "x"
    alone = tmp_path / "alone.h5ad"
    cells.write_h5ad(alone)
    lines.clear()
    result = evaluate(run, [alone], tmp_path / "out", **quick)
    assert result["settings"]["batch_key"] is None and any("not applicable" in line for line in lines)
    scores = result["scib"]["concept"]
    assert scores["Total"] is None and scores["Batch correction"] is None and scores["iLISI"] is None
    assert 0 <= scores["Bio conservation"] <= 1 and scores["KMeans NMI"] is not None
    report_text = (tmp_path / "out" / "report.md").read_text()
    assert "no batch key" in report_text and "| n/a |" in report_text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["scib"]["concept"]["KBET"] is None


def test_umap_titles_carry_the_scores_and_colours_are_distinct():
    """umap.png had no scores in its titles and paired colours (T and B cells both blue)."""
    from concept_train.eval.evaluate import _umap_titles
    from concept_train.eval.report import PALETTE

    scib = {"concept": {"Bio conservation": 0.7, "Batch correction": 0.5, "iLISI": 0.25}}
    titles = _umap_titles(scib, {"concept": {"cell_type": 0.9}}, "cell_type", "donor_id")
    assert titles == {
        "concept": {
            "cell_type": "kNN 0.900, bio conservation 0.700",
            "donor_id": "batch correction 0.500, iLISI 0.250",
        }
    }
    assert len(set(PALETTE)) == len(PALETTE) >= 20


def test_outputs_are_published_as_one_set_or_not_at_all(tmp_path):
    """A killed concept-eval left metrics.json of one run beside report.md of another; a run
    without umap.png kept the previous run's."""
    from concept_train.eval import report

    out = tmp_path / "eval"
    out.mkdir()
    with report.staged(out) as stage:
        for name in report.OUTPUTS:
            (stage / name).write_text(f"first {name}")
    first = {p.name: p.read_text() for p in out.iterdir()}
    assert first == {name: f"first {name}" for name in report.OUTPUTS}
    with pytest.raises(RuntimeError):
        with report.staged(out) as stage:
            (stage / "metrics.json").write_text("second")
            raise RuntimeError("killed while drawing the UMAP")
    assert {p.name: p.read_text() for p in out.iterdir()} == first  # the previous set, and no stage
    (out / ".concept-eval.999999999.tmp").mkdir()  # a dead process's stage
    with report.staged(out) as stage:
        for name in ("metrics.json", "scib.csv", "report.md"):
            (stage / name).write_text(f"third {name}")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        name: f"third {name}" for name in ("metrics.json", "scib.csv", "report.md")
    }


def test_a_missing_eval_extra_is_named_before_any_work(trained_run, tmp_path, monkeypatch):
    """`pip install .` leaves the `eval` extra out: concept-eval names it (and --no-umap when only
    the UMAP is missing) before it loads or writes anything. The packages are made unimportable
    for this test as an absent distribution is (sys.modules holds None)."""
    _, run = trained_run
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(UserError, match=r"(?s)needs umap-learn, .*concept-pretrain\[eval\].*--no-umap"):
        evaluate(run, [], out)
    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    with pytest.raises(UserError, match=r"(?s)needs scib-metrics and umap-learn, .*concept-pretrain\[eval\]"):
        evaluate(run, [], out)
    assert not out.exists()
