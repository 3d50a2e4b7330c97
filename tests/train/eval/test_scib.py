"""concept-eval's kBET per label (concept_train/eval/scib.py) against scib-metrics' own: its figures
for seeded synthetic cases (tools/make_kbet_reference.py wrote them with scib-metrics, whose
pynndescent search costs 40-50 s of compilation per process), and its chi-square step against
scib-metrics' `kbet` on the same neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concept_train.eval.scib import exact_neighbours, kbet_acceptance, kbet_per_label

REFERENCE = Path(__file__).parent / "data" / "kbet_reference.npz"


def _cases():
    ref = np.load(REFERENCE)
    return [(ref[f"x{i}"], ref[f"labels{i}"], ref[f"batches{i}"], float(ref[f"kbet{i}"])) for i in range(4)]


def test_kbet_per_label_gives_scib_metrics_figures_and_the_same_one_twice():
    for x, labels, batches, expected in _cases():
        nn50 = exact_neighbours(x, 90).subset_neighbors(n=50)
        got = kbet_per_label(nn50, batches, labels)
        assert got == pytest.approx(expected, abs=2e-3), (got, expected)
        assert kbet_per_label(nn50, batches, labels) == got  # a fixed ARPACK start: no drift between calls


def test_the_chi_square_step_equals_scib_metrics_kbet():
    import scib_metrics as sm

    x, _, batches, _ = _cases()[1]
    neighbours = exact_neighbours(x, 31)
    codes = np.unique(batches, return_inverse=True)[1]
    expected, _, _ = sm.kbet(neighbours, batches=batches, alpha=0.05)
    assert kbet_acceptance(neighbours.indices, codes, 0.05) == pytest.approx(float(expected), abs=1e-12)
    # cells of one batch are no test at all: left out (NaN), as scib-metrics does
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"):
        alone = kbet_per_label(
            exact_neighbours(x, 50), np.zeros(len(codes)).astype(str), np.zeros(len(codes)).astype(str)
        )
    assert np.isnan(alone)
