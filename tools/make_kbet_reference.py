"""Write tests/train/eval/data/kbet_reference.npz: embeddings, labels and batches of a few seeded
synthetic cases with scib-metrics' own `kbet_per_label` figure for each, which
tests/train/eval/test_scib.py holds concept-eval's kBET (concept_train/eval/scib.py) to without
paying scib-metrics' 40-50 s of pynndescent compilation.

    .venv/bin/python tools/make_kbet_reference.py     # ~1 minute; re-run after a scib-metrics upgrade
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "train" / "eval" / "data" / "kbet_reference.npz"
# (seed, cells, labels, batches, batch shift): mixed and separated batches, 2 to 4 of them
CASES = [(0, 600, 6, 3, 0.0), (1, 800, 8, 2, 1.0), (3, 1500, 10, 3, 0.5), (4, 400, 3, 2, 2.0)]


def case(seed: int, n: int, n_labels: int, n_batches: int, shift: float):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n).astype(str)
    batches = rng.integers(0, n_batches, n)
    x = rng.normal(size=(n, 16)) + shift * np.eye(16)[batches] + 2 * np.eye(16)[rng.integers(0, 16, n)]
    return x.astype(np.float32), labels, batches.astype(str)


def main() -> None:
    import scib_metrics as sm

    from concept_train.eval.scib import exact_neighbours

    arrays = {}
    for i, spec in enumerate(CASES):
        x, labels, batches = case(*spec)
        nn50 = exact_neighbours(x, 90).subset_neighbors(n=50)
        arrays |= {f"x{i}": x, f"labels{i}": labels, f"batches{i}": batches}
        arrays[f"kbet{i}"] = np.float64(sm.kbet_per_label(nn50, batches, labels))
        print(f"case {i} {spec}: scib-metrics kbet_per_label {float(arrays[f'kbet{i}']):.6f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
