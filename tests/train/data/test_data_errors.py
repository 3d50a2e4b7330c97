"""Start-up errors of the data pipeline name the file and the fix; nothing is modified."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import ADVANCED, data_module, shard

from concept_shard.errors import ConfigError, UserError
from concept_train.data import DataError


@pytest.fixture
def sharded(project):
    assert shard("build", project, *ADVANCED, "--no-progress") == 0
    return project


def test_missing_and_stale_shards_are_listed_with_the_command_to_run(sharded):
    shutil.rmtree(sharded / "shards/hsapiens/synth_hsapiens/hs_lung_b")
    with open(sharded / "data/synth_mmusculus/h5ads/mm_brain_a.h5ad", "r+b") as fh:  # same size, new content
        fh.seek(-16, 2)
        tail = fh.read(16)
        fh.seek(-16, 2)
        fh.write(bytes(255 - b for b in tail))
    with pytest.raises(DataError) as err:
        data_module(sharded)
    text = " ".join(str(err.value).split())
    assert "hs_lung_b" in text and "not sharded" in text
    assert "mm_brain_a" in text and "changed since it was sharded" in text
    assert "concept-shard build" in text and "2 file(s)" in text


def test_shards_copied_without_their_sources_train_with_check_sources_off(sharded):
    """A GPU node often gets the shards and not the .h5ad files: the error says how to go on, and
    with the check off the same cells come out; missing shards are still an error."""
    reference = next(iter(data_module(sharded).train_loader()))
    shutil.move(sharded / "data", sharded.parent / "data_elsewhere")
    with pytest.raises(DataError) as err:
        data_module(sharded)
    text = " ".join(str(err.value).split())
    assert "hs_blood_a.h5ad no longer exists" in text and "datamodule.check_sources=false" in text
    assert "not on this machine" in text and "concept-shard build" not in text  # rebuilding cannot help
    with pytest.raises(ConfigError, match="datamodule.check_sources"):  # the schema: true, full or false
        data_module(sharded, ["datamodule.check_sources=maybe"])
    copied = next(iter(data_module(sharded, ["datamodule.check_sources=false"]).train_loader()))
    assert torch.equal(copied.tokens, reference.tokens) and torch.equal(copied.values, reference.values)
    shutil.rmtree(sharded / "shards/hsapiens/synth_hsapiens/hs_lung_b")
    with pytest.raises(DataError, match="not sharded"):
        data_module(sharded, ["datamodule.check_sources=false"])


def test_start_up_trusts_size_and_mtime_and_full_reads_every_source(sharded):
    """By default a source whose size and mtime are the recorded ones is not read (3,000 files on
    a network filesystem); `check_sources=full` reads each one's fingerprint and sees an edit whose
    mtime was put back."""
    import os

    src = sharded / "data/synth_mmusculus/h5ads/mm_brain_a.h5ad"
    st = src.stat()
    with open(src, "r+b") as fh:  # same size, new content in the last sampled block
        fh.seek(-16, 2)
        tail = fh.read(16)
        fh.seek(-16, 2)
        fh.write(bytes(255 - b for b in tail))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_module(sharded).train_sets  # trusted: size and mtime unchanged
    with pytest.raises(DataError, match=r"(?s)mm_brain_a.*changed since it was"):
        data_module(sharded, ["datamodule.check_sources=full"])
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"(?s)mm_brain_a.*changed since it was"):
        data_module(sharded)  # a new mtime: the source is read


def test_changed_vocabulary_makes_shards_stale(sharded):
    csv = sharded / "references/vocabulary/token_mappings_per_specie/mmusculus.csv"
    csv.write_text(csv.read_text() + "ENSMUSG99999999999,NEWGENE,999999\n")
    with pytest.raises(DataError) as err:
        data_module(sharded)
    text = " ".join(str(err.value).split())
    assert "mm_brain_a" in text and "hs_blood_a" not in text
    assert "token mapping" in text and "mmusculus.csv changed since it was sharded" in text


@pytest.mark.parametrize(
    "content,problem",
    [
        ("gene\nENSG00000141510\n", "no `Ensembl_ID` column"),
        ("Ensembl_ID\n", "lists no genes"),
        ("Ensembl_ID\nENSG_NOT_A_GENE\n", "no gene in the hsapiens vocabulary"),
    ],
)
def test_malformed_panel_csv_is_a_clear_start_up_error(sharded, content, problem):
    bad = sharded / "panels/hsapiens/bad_panel.csv"
    bad.write_text(content)
    with pytest.raises(DataError) as err:
        data_module(sharded).train_loader()
    text = " ".join(str(err.value).split())
    assert str(bad) in text and problem in text
    # a regex that excludes the bad file starts fine
    data_module(sharded, ["datamodule.dataset.train.panel_filter_regex='^(immune|tissue|brain)'"]).train_loader()


def test_bad_loader_options_name_the_key(sharded):
    for override, key in [
        ("datamodule.normalization=zscore", "datamodule.normalization"),
        ("datamodule.gene_sampling_strategy=best", "datamodule.gene_sampling_strategy"),
        ("datamodule.dataset.train.panel_selection=fancy", "panel_selection"),
        ("datamodule.dataset.train.batching=whatever", "batching"),
        ("datamodule.dataloader.train.batch_size=100000", "yields no batch"),
    ]:
        with pytest.raises(UserError) as err:  # the schema's ConfigError, or the loader's DataError
            data_module(sharded, [override]).train_loader()
        assert key in " ".join(str(err.value).split())


def test_a_validation_loader_without_a_full_batch_is_skipped_with_a_word(sharded):
    """It stopped training, even with validation off; scConcept's loader is empty then."""
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    lines = []
    cfg = compose_config(sharded, [*ADVANCED, "datamodule.dataloader.val.whole_cell_B256.batch_size=100000"])
    loaders = DataModule(cfg, log=lines.append).val_loaders()
    assert "whole_cell_B256" not in loaders and len(loaders) == len(cfg.datamodule.dataset.val) - 1
    said = [line for line in lines if "validation loader whole_cell_B256 is skipped" in line]
    assert len(said) == 1 and "yields no batch" in said[0]


def test_a_file_without_cells_is_skipped_with_a_word_and_an_absent_obs_key_is_named(project):
    """A 0-cell dataset broke training with streaming's "Stream contains no samples"; an obs key
    that no file has gave null kNN in silence."""
    import anndata as ad
    import scipy.sparse as sp

    src = ad.read_h5ad(project / "data/synth_hsapiens/h5ads/hs_val_e.h5ad")
    empty = ad.AnnData(X=sp.csr_matrix((20, src.n_vars), dtype="float32"), var=src.var[[]])
    empty.write_h5ad(project / "data/synth_hsapiens/h5ads/hs_empty.h5ad")
    split = [
        "datamodule.split_synth_hsapiens.train=[hs_blood_a.h5ad,hs_empty.h5ad]",
        "datamodule.obs_keys=[cell_type,no_such_column]",
    ]
    assert shard("build", project, *ADVANCED, *split, "--no-progress") == 0
    lines = []
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    dm = DataModule(compose_config(project, ADVANCED + split), log=lines.append)
    text = " ".join(lines)
    assert "skipping 1 file(s) whose shards hold no cells: hsapiens/synth_hsapiens/hs_empty" in text
    assert "hs_empty" not in {s.dataset_id.split("/")[-1] for s in dm.train_sets}
    assert "'no_such_column' is a column of none of the files" in text
    next(iter(dm.train_loader()))


def _remove_while_read(path):
    """rmtree of a directory that running DataLoader workers may still be writing a decompressed
    shard into (rmtree then meets a file it did not list: "Directory not empty")."""
    import time

    for _ in range(100):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} could not be removed")


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_deleted_under_a_running_loader_are_a_named_error(sharded, workers):
    """Deleting or rebuilding shards under a running training gave streaming's raw errors (and,
    from a DataLoader worker, a RuntimeError holding a traceback)."""
    dm = data_module(sharded, [f"datamodule.dataloader.train.num_workers={workers}"])
    loader = dm.train_loader()
    with pytest.raises(DataError) as err:
        for i, _ in enumerate(loader):
            if i == 0:
                for species in ("hsapiens", "mmusculus"):
                    _remove_while_read(sharded / "shards" / species)
            assert i < 200, "the loader went on reading shards that were deleted"
    text = " ".join(str(err.value).split())
    assert "could not be read while training" in text and "initialize.resume=True" in text


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damaged", ["shard read in place", "raw copy", "compressed shard"])
def test_a_damaged_shard_is_a_named_error_never_a_batch(sharded_project_copy, earlier_project_copy, damaged, workers):
    """A flipped byte in a shard (same size: no count or index check sees it) trained on other
    losses, exit 0. Now the raw bytes a process maps are checked against index.json's hash the
    first time (a shard read in place, or the decompressed copy streaming leaves beside a `.zstd`
    of the earlier format), and a `.zstd` before streaming decompresses it: a DataError naming the
    dataset and file, from workers too."""
    import zstd

    project = sharded_project_copy if damaged == "shard read in place" else earlier_project_copy
    lung = project / "shards/hsapiens/synth_hsapiens/hs_lung_b"
    stored, target = lung / "shard.00000.mds.zstd", lung / "shard.00000.mds"
    if damaged != "shard read in place":
        # as streaming decompresses on first use (a copy of the shared example may hold it already)
        target.write_bytes(zstd.decompress(stored.read_bytes()))
    if damaged == "compressed shard":  # not decompressed yet
        target.unlink()
        target = stored
    data = bytearray(target.read_bytes())
    data[-40] ^= 0x10
    target.write_bytes(bytes(data))
    loader = data_module(project, [f"datamodule.dataloader.train.num_workers={workers}"]).train_loader()
    with pytest.raises(DataError) as err:
        for i, _ in enumerate(loader):
            assert i < 500, "the loader read every batch of a damaged shard"
    text = " ".join(str(err.value).split())
    assert "hs_lung_b" in text and "concept-shard build --verify" in text, text
    assert "is damaged" in text and f"{target.name}: its bytes do not match the xxh3_64 hash" in text


def test_a_process_whose_worker_met_a_damaged_shard_exits(earlier_project_copy):
    """With two workers, one failed to decompress a damaged `.zstd` in streaming while the other
    waited for good for it to be prepared: the process hung, before the error (when the batch the
    main process waited for was the waiting worker's) or at exit, joining that worker, which
    ignored the SIGTERM (workers ignore stop signals: the main process decides when to stop)."""
    import subprocess
    import sys
    from pathlib import Path

    stored = earlier_project_copy / "shards/hsapiens/synth_hsapiens/hs_lung_b/shard.00000.mds.zstd"
    stored.with_suffix("").unlink(missing_ok=True)  # not decompressed yet
    data = bytearray(stored.read_bytes())
    data[-40] ^= 0x10
    stored.write_bytes(bytes(data))
    run = Path(__file__).with_name("data_run.py")
    out = earlier_project_copy.parent / "x.pt"
    cmd = [sys.executable, str(run), str(earlier_project_copy), str(out), "--take", "500"]
    proc = subprocess.run(
        cmd + ["datamodule.dataloader.train.num_workers=2"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "is damaged" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_shard_records_that_leave_the_dataset_directory_are_refused_at_start(sharded_project_copy):
    """A shard basename `../../x.mds` in index.json made training write outside the project."""
    import json

    from concept_shard.integrity import index_digest

    lung = sharded_project_copy / "shards/hsapiens/synth_hsapiens/hs_lung_b"
    index = json.loads((lung / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = "../../../../../outside.mds"
    (lung / "index.json").write_text(json.dumps(index))
    record = json.loads((lung / "dataset.json").read_text())
    (lung / "dataset.json").write_text(
        json.dumps(dict(record, index_digest=index_digest((lung / "index.json").read_bytes())))
    )
    with pytest.raises(DataError) as err:
        data_module(sharded_project_copy)
    text = " ".join(str(err.value).split())
    assert "hs_lung_b" in text and "damaged" in text and "shard.00000.mds" in text
    assert "concept-shard build" in text
    assert not list(sharded_project_copy.parent.glob("outside*"))
