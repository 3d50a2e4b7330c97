"""The groups of `within_group_sampling`: which cells may share a global batch.

Reference semantics (scConcept's WithinGroupSampler; docs/design.md, "Batches, panels and tokens"):
a cell's group is its values of the configured obs keys; `dataset` is the input file. Cells with a
missing value (an empty string in the shards) are dropped. Every batch holds one group. Here a
group is also always within one species (panels and token spaces are per species), so a group
keyed by `donor_id` alone spans the files of one species, never two species. A group is the tuple
of its values, which the reference joins with "_" (two different tuples that join to the same
string would share a group there; here they do not).

Once per loader, with the loader's seed (`pool_cut`): keep `num_groups` random groups when set;
with `sample_groups_equally` cut each group to max(num_samples // n_groups, batch_size) cells,
else, when the loader holds more than `num_samples` cells, cut each group in proportion, keeping
at least one batch. A cut keeps a random subset (the group is shuffled first); without a cut
nothing is shuffled here, which changes no distribution (each epoch shuffles every group anew)
and keeps the `dataset` grouping identical to the plan it replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from concept_shard.errors import DataError

from ..read.catalog import ShardSet

FILE_KEY = "dataset"
_POOL = 0x67726F75  # tags the fixed pool's generators apart from the per-epoch ones of plan.py ([seed, epoch, ...])


@dataclass
class Group:
    species: str
    datasets: np.ndarray | None  # per cell: dataset index (int32); None with `file` set: all rows of one file
    rows: np.ndarray | None  # per cell: row in that dataset (int64)
    file: int | None = None  # the group is every cell of this dataset, in row order
    size: int = 0

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        if self.file is not None:
            return np.full(self.size, self.file, np.int32), np.arange(self.size, dtype=np.int64)
        return self.datasets, self.rows

    @property
    def files(self) -> np.ndarray:
        if self.file is not None:
            return np.array([self.file], np.int32)
        return np.unique(self.datasets)


def group_keys(value, where: str) -> list[str] | None:
    """`within_group_sampling` as a list of obs keys (None: no grouping)."""
    if value is None:
        return None
    keys = [value] if isinstance(value, str) else list(value) if hasattr(value, "__iter__") else None
    if not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise DataError(
            where,
            f"is {value!r}.",
            "Use null (no grouping), an obs key (`dataset` = the input file) or a list of obs keys.",
        )
    out = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def file_groups(sets: list[ShardSet]) -> list[Group]:
    return [Group(s.species, None, None, file=f, size=s.n_samples) for f, s in enumerate(sets)]


def obs_groups(
    sets: list[ShardSet],
    keys: list[str],
    codes_of: Callable[[int, str], tuple[np.ndarray, np.ndarray]],
    where: str,
    log=print,
) -> list[Group]:
    """The groups of `keys` over the loader's datasets. `codes_of(f, key)` gives (categories,
    codes per cell, -1 = missing) of an obs column of dataset f."""
    species = sorted({s.species for s in sets})
    obs_keys = [k for k in keys if k != FILE_KEY]
    # per key, the categories of all datasets merged, so one code means one value everywhere
    per_file: list[list[np.ndarray]] = [[] for _ in sets]
    for key in obs_keys:
        cats = [codes_of(f, key) for f in range(len(sets))]
        merged = np.unique(np.concatenate([c for c, _ in cats])) if cats else np.zeros(0, "S1")
        for f, (c, codes) in enumerate(cats):
            remap = np.searchsorted(merged, c).astype(np.int64)
            per_file[f].append(np.where(codes >= 0, remap[np.maximum(codes, 0)] if len(remap) else -1, -1))
            if len(c) == 0 and sets[f].n_samples:
                log(
                    f"[data] {where}: '{key}' has no value in {sets[f].dataset_id}; its {sets[f].n_samples} cells "
                    "are left out of the loader's batches."
                )
    # one row per cell: species, the file (when `dataset` is a key), then each obs key's code
    columns, ds_all, rows_all = [], [], []
    for f, s in enumerate(sets):
        n = s.n_samples
        cols = [np.full(n, species.index(s.species), np.int64)]
        if FILE_KEY in keys:
            cols.append(np.full(n, f, np.int64))
        cols += per_file[f]
        columns.append(np.stack(cols, axis=1) if n else np.zeros((0, len(cols)), np.int64))
        ds_all.append(np.full(n, f, np.int32))
        rows_all.append(np.arange(n, dtype=np.int64))
    table = np.concatenate(columns)
    datasets, rows = np.concatenate(ds_all), np.concatenate(rows_all)
    valid = (table >= 0).all(axis=1)
    dropped = int((~valid).sum())
    if dropped:
        log(f"[data] {where}: {dropped} of {len(valid)} cells have no value for one of {keys} and are left out.")
    table, datasets, rows = table[valid], datasets[valid], rows[valid]
    if len(table) == 0:
        return []
    # lexicographic order of the key tuples (then file, row: a stable sort keeps cells in loader order)
    order = np.lexsort(table.T[::-1])
    table, datasets, rows = table[order], datasets[order], rows[order]
    bounds = np.flatnonzero((table[1:] != table[:-1]).any(axis=1)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(table)]])
    return [Group(species[int(table[a, 0])], datasets[a:b], rows[a:b], size=int(b - a)) for a, b in zip(starts, ends)]


def pool_cut(
    groups: list[Group],
    batch_size: int,
    seed: int,
    num_samples: int | None,
    num_groups: int | None,
    equally: bool,
    total_cells: int,
) -> list[Group]:
    """The reference's fixed pool: a subset of the groups, each cut to its share (see the module
    docstring). `total_cells` is every cell of the loader (the reference's default num_samples)."""
    n_samples = int(num_samples) if num_samples is not None else int(total_cells)
    chosen = list(range(len(groups)))
    if num_groups is not None and int(num_groups) < len(groups):
        rng = np.random.default_rng([seed, _POOL, 5])
        chosen = sorted(rng.choice(len(groups), int(num_groups), replace=False).tolist())
    kept = [groups[i] for i in chosen]
    if equally and kept:
        per_group = max(n_samples // len(kept), batch_size)
        limits = [min(g.size, per_group) for g in kept]
    else:
        total = sum(g.size for g in kept)
        limits = [g.size for g in kept]
        if total > n_samples:
            limits = [min(g.size, max(int(g.size / total * n_samples), batch_size)) for g in kept]
    out = []
    for i, g, limit in zip(chosen, kept, limits):
        if limit >= g.size:
            out.append(g)
            continue
        keep = np.random.default_rng([seed, _POOL, 4, i]).permutation(g.size)[:limit]
        datasets, rows = g.members()
        out.append(Group(g.species, datasets[keep], rows[keep], size=int(limit)))
    return out
