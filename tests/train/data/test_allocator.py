"""A process that makes batches keeps the pages it frees for the next batch (deliver/allocator.py):
the arrays of a batch, made and freed again and again, stop costing page faults. Each check runs
in a fresh process, since the setting is the process's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]

# A batch's pattern: a few arrays of a few MB each, made, written and freed together, over and
# over; prints the page faults (minor: no disk) of the last 20 rounds.
CHURN = """
import resource, numpy as np
def rounds(n):
    for _ in range(n):
        arrays = [np.ones(s, np.float64) for s in (400_000, 250_000, 380_000, 120_000, 300_000)]
        del arrays
rounds(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setup: str = "") -> int:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n{setup}\n{CHURN}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the setting is glibc's")


def test_kept_pages_are_not_faulted_in_again():
    untouched = faults()
    # twice: the second call is a no-op that says so
    kept = faults("from concept_train.data.deliver.allocator import keep_freed_memory as k\nassert k() and k()")
    assert untouched > 20 * 1000  # glibc's defaults: most of each round's ~11 MB faulted in again
    assert kept < untouched / 100


def test_a_loader_that_makes_batches_in_this_process_keeps_them(sharded_example):
    make = f"""
from helpers import data_module
from pathlib import Path
dm = data_module(Path({str(sharded_example)!r}), ["datamodule.dataloader.train.num_workers=0"])
{{}}
"""
    iterated = faults(make.format("next(iter(dm.train_loader()))"))
    not_iterated = faults(make.format("dm.train_loader()"))
    assert not_iterated > 20 * 1000  # making the data module alone changes nothing
    assert iterated < not_iterated / 100
