"""concept-train's console: Python logging (logger "concept") with a quiet and a verbose level, and
a validation check shown as a small table (concept_shard/console.py, trainer/metrics.py)."""

from __future__ import annotations

import logging
import sys

import pytest

from concept_config.training import WandbKeys
from concept_shard import console
from concept_train.cli import main as train_main
from concept_train.trainer.metrics import MetricsLog

TRAIN = {"kind": "train", "step": 100, "loss": 3.2, "lr": 1e-4, "recall@1": 0.25, "batch_digest": "ab12"}
VAL = {
    "kind": "val",
    "step": 100,
    "val/whole_cell/loss": 3.5,
    "val/whole_cell/recall@1": 0.125,
    "val/whole_cell/recall@5": 0.5,
    "val/whole_cell/knn/cell_type": 0.9375,
    "val/whole_cell/cells": 512,
    "val/P200/loss": 4.25,
    "val/P200/recall@1": 0.0625,
    "val/P200/recall@5": 0.25,
}


@pytest.fixture(autouse=True)
def _restore_logger():
    yield
    for handler in list(console.LOGGER.handlers):
        console.LOGGER.removeHandler(handler)
    console.LOGGER.setLevel(logging.NOTSET)


def _lines(tmp_path, capsys, **levels) -> list[str]:
    tmp_path.mkdir(exist_ok=True)
    console.setup(**levels)
    log = MetricsLog(tmp_path, WandbKeys(), {}, True, "r", log=console.say, max_steps=1000)
    log.write(dict(TRAIN))
    log.write(dict(VAL))
    console.say("[train] WARNING: something to act on")
    return capsys.readouterr().out.splitlines()


def test_default_level_shows_progress_and_a_validation_table(tmp_path, capsys):
    lines = _lines(tmp_path, capsys)
    assert lines[0].startswith("[train] step=100/1000 ") and "loss=3.2" in lines[0] and "batch_digest" not in lines[0]
    table = [line for line in lines if line.startswith("[val]")]
    assert table[0] == "[val] step=100:"
    header = table[1].split()
    assert header[:5] == ["[val]", "loader", "loss", "recall@1", "recall@5"] and "knn(cell_type)" in header
    assert table[2].split()[1:] == ["whole_cell", "3.5", "0.125", "0.5", "0.9375", "512"]
    assert table[3].split()[1:] == ["P200", "4.25", "0.0625", "0.25", "-", "-"]
    assert lines[-1] == "[train] WARNING: something to act on"


def test_quiet_shows_warnings_only_and_verbose_every_metric(tmp_path, capsys, monkeypatch):
    assert _lines(tmp_path / "q", capsys, quiet=True) == ["[train] WARNING: something to act on"]
    verbose = _lines(tmp_path / "v", capsys, verbose=True)
    assert any("batch_digest=ab12" in line for line in verbose)
    monkeypatch.setenv(console.LEVEL_ENV, "warning")  # what torchrun / sbatch children read
    assert _lines(tmp_path / "e", capsys) == ["[train] WARNING: something to act on"]


def test_concept_train_takes_the_flags(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert train_main(["-q", str(tmp_path), "--cfg", "job"]) == 0
    assert "datamodule:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main(["-q", "-v", str(tmp_path)])  # one or the other


def test_wandb_enabled_without_the_package_is_named(tmp_path, monkeypatch):
    """A lean install leaves wandb out: wandb.enabled=true names the extra instead of an
    ImportError (the package made unimportable as an absent distribution is)."""
    from concept_shard.errors import TrainError

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(
        TrainError, match=r"(?s)wandb.enabled: is true, but the wandb package cannot be imported.*\[wandb\]"
    ):
        MetricsLog(tmp_path, WandbKeys(enabled=True), {}, True, "r", log=console.say)
    assert not (tmp_path / "wandb").exists()


def test_a_program_run_as_such_collects_rarely_and_leaves_without_the_last_collections_and_callers_keep_theirs():
    """console.program: main(argv=None) (the console script, python -m, torchrun) raises the
    youngest generation's threshold and freezes the collector before the exit; a caller that passes
    argv (a test, a notebook) keeps both as they were. few_collections (a program module's imports)
    restores the threshold after its block."""
    import gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    said, seen = [], []

    def body(argv=None):
        said.append(argv)
        seen.append(gc.get_threshold())
        return 3

    main = console.program(body)
    try:
        gc.set_threshold(700, 10, 10)
        assert main(["--help"]) == 3 and gc.get_freeze_count() == frozen
        assert seen[-1] == (700, 10, 10) == gc.get_threshold()
        assert main() == 3 and gc.get_freeze_count() > frozen
        assert seen[-1] == (console.PROGRAM_GEN0, 10, 10)
        gc.set_threshold(700, 10, 10)
        with console.few_collections():
            assert gc.get_threshold() == (console.PROGRAM_GEN0, 10, 10)
        assert gc.get_threshold() == (700, 10, 10)
        with pytest.raises(ImportError), console.few_collections():  # restored when the block raises
            raise ImportError("no such module")
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0)  # collection switched off stays off
        with console.few_collections():
            assert gc.get_threshold()[0] == 0
        assert main() == 3 and seen[-1][0] == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert said == [["--help"], None, None]
