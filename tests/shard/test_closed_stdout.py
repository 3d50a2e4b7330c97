"""`concept-shard build PROJECT | head -1`: the reader of stdout leaves after the first line; the
build still runs to its end (its workers, then the merge) quietly: no BrokenPipeError traceback,
no "--- Logging error ---", exit status 0."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, dataset_dirs, shard


def test_a_build_whose_stdout_reader_leaves_after_one_line_still_merges_quietly(small_project, capsys):
    # two workers: the first line ("... 2 workers ...") comes before the work, every later one after
    # the pipe is closed; unbuffered, so each line is written when printed
    proc = subprocess.Popen(
        [sys.executable, "-m", "concept_shard.cli", "build", str(small_project), "--no-progress", "--workers", "2"],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, err
    assert "2 workers" in first, first
    assert "Traceback" not in err and "Logging error" not in err and "BrokenPipe" not in err, err
    built = len(dataset_dirs(small_project))
    assert built >= 6
    capsys.readouterr()
    assert shard("build", str(small_project)) == 0
    # all there: the re-run has nothing to do
    assert f"0 built, {built} up to date, 0 waiting" in capsys.readouterr().out
