"""Which cells make global batch g: a pure function of (seed, g) and the loader's datasets.

Batches are cut from units, each a set of cells that may share a batch:

- `per_dataset` (default, as the reference's `within_group_sampling: dataset`): a unit per file;
  an epoch draws `c_f` of its rows (its size, or `repeat` x its size, or its share under
  `proportion`);
- `groups` (`within_group_sampling` with obs keys, groups.py): a unit per group of cells sharing
  the keys' values, within one species, after the loader's fixed cut (`num_samples`,
  `num_groups`, `sample_groups_equally`);
- `mixed` (`within_group_sampling: null`): the rows of all files of one species are pooled and
  shuffled, then cut; a batch holds one species but many files. The pool is never materialised:
  position p of its shuffled order is a keyed permutation evaluated on demand (permutation.py),
  so memory per process does not grow with the cells and no epoch starts with a stall.

Each epoch shuffles every unit's cells and cuts them into full global batches (a last partial
one only with drop_last false), and the order of all units' batches is shuffled, so units
contribute in proportion to their size. Global batch g is batch `g mod K` of epoch `g // K` (K
batches per epoch, constant; `limit` keeps the first K of an epoch's shuffled batches, as
Lightning's limit_train_batches). Nothing here depends on the number of ranks or workers, so every
rank computes the same plan, and resuming at batch g needs nothing but g.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from concept_shard.errors import DataError

from ..read.catalog import ShardSet
from .groups import Group, file_groups
from .permutation import key_of, permute


class NoBatch(DataError):
    """A loader whose cells make not one full batch (a validation loader is skipped, with a word)."""


@dataclass
class PlannedBatch:
    index: int  # g: batches since the start of training (across epochs)
    epoch: int
    in_epoch: int
    species: str
    datasets: np.ndarray  # per cell: index of its dataset in the loader's list (int32)
    rows: np.ndarray  # per cell: row (sample index) within that dataset (int64)
    unit: int = 0  # the file, group or species the batch was cut from
    files: tuple = ()  # the datasets of that unit (its panels are drawn over their genes)


class BatchPlan:
    def __init__(
        self,
        sets: list[ShardSet],
        batch_size: int,
        seed: int,
        batching: str = "per_dataset",
        shuffle: bool = True,
        drop_last: bool = True,
        epoch_size: int | None = None,
        where: str = "loader",
        groups: list[Group] | None = None,
        group_spec: dict | None = None,
        limit=None,
        limit_key: str = "model.training.limit_train_batches",
    ):
        """`groups` (with batching="groups"): the loader's units, already cut; `group_spec`: what
        made them (keys, cut settings), for the digest; `limit`: limit_train_batches."""
        self.sets, self.batch_size, self.seed = sets, int(batch_size), int(seed)
        self.batching, self.shuffle, self.drop_last = batching, bool(shuffle), bool(drop_last)
        self.species = sorted({s.species for s in sets})
        self.group_spec = group_spec
        B = self.batch_size
        cut = (lambda c: c // B) if drop_last else (lambda c: -(-c // B))
        if batching == "groups":
            if groups is None:
                raise ValueError("batching='groups' needs groups")
            self.groups = list(groups)
            self.per_epoch = [g.size for g in self.groups]
            unit_cells = self.per_epoch
        else:
            self.per_epoch = _samples_per_epoch(sets, epoch_size, where)
            if batching == "per_dataset":
                self.groups = file_groups(sets)
                unit_cells = self.per_epoch
            else:
                self.groups = None
                unit_cells = [sum(c for c, s in zip(self.per_epoch, sets) if s.species == sp) for sp in self.species]
        self._unit_cells = [int(c) for c in unit_cells]  # cells per epoch of each unit
        self._units = [int(cut(c)) for c in self._unit_cells]  # its batches per epoch
        self.full_epoch = sum(self._units)
        if self.full_epoch == 0:
            unit = {"per_dataset": "file", "mixed": "species", "groups": "group"}[batching]
            raise NoBatch(
                where,
                f"yields no batch: its {sum(self.per_epoch)} cells per epoch are fewer than "
                f"one global batch of {B} in every {unit}.",
                "Lower the batch size, add files, or set drop_last: false.",
            )
        self.limit = limit
        self.batches_per_epoch = _limited(self.full_epoch, limit, limit_key)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._draws: dict[tuple[int, int], np.ndarray] = {}
        self._pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._digest = None
        self._files: dict[int, tuple] = {}
        self._n_samples = np.array([s.n_samples for s in sets], np.int64)

    @property
    def digest(self) -> str:
        """Identifies the batch sequence: a resumed loader must have the same."""
        if self._digest is None:
            spec = {
                "sets": [[s.dataset_id, s.n_samples] for s in self.sets],
                "per_epoch": self.per_epoch,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "batching": self.batching,
                "shuffle": self.shuffle,
                "drop_last": self.drop_last,
            }
            if self.batching == "groups":  # which cells each group holds, in pool order
                h = hashlib.sha256()
                for g in self.groups:
                    datasets, rows = g.members()
                    h.update(g.species.encode() + b"\0")
                    h.update(np.ascontiguousarray(datasets, np.int32).tobytes())
                    h.update(np.ascontiguousarray(rows, np.int64).tobytes())
                spec["groups"] = [self.group_spec, h.hexdigest()]
            if self.batching == "mixed":  # the on-demand order, not the materialised one
                spec["order"] = "feistel-1"
            if self.batches_per_epoch != self.full_epoch:
                spec["batches_per_epoch"] = self.batches_per_epoch
            self._digest = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
        return self._digest

    def unused(self) -> tuple[int, int, int]:
        """(cells an epoch leaves out, cells per epoch, units without one full batch): with
        drop_last every unit's last partial batch is dropped, as in the reference."""
        total = sum(self._unit_cells)
        if not self.drop_last:
            return 0, total, 0
        return total - self.batch_size * self.full_epoch, total, self._units.count(0)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    # ---- one epoch ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit of each batch, its occurrence number within the unit) for the batches of `epoch`."""
        if epoch not in self._epochs:
            units = np.repeat(np.arange(len(self._units), dtype=np.int32), self._units)
            if self.shuffle:
                units = units[self._rng(epoch, 0).permutation(len(units))]
            order = np.argsort(units, kind="stable")
            starts = np.concatenate([[0], np.cumsum(self._units)[:-1]])
            occurrence = np.empty(len(units), np.int64)
            occurrence[order] = np.arange(len(units)) - starts[units[order]]
            if len(self._epochs) >= 2:  # workers move forward: keep the current and next epoch
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (units, occurrence)
        return self._epochs[epoch]

    def _draw(self, epoch: int, u: int, n: int, c: int) -> np.ndarray:
        """The c positions (into n cells) unit u contributes to `epoch`, in epoch order."""
        key = (epoch, u)
        if key not in self._draws:
            if n == 0 or c == 0:  # a file whose cells were all dropped by the sharder
                pos = np.zeros(0, np.int64)
            elif not self.shuffle:
                pos = np.arange(c, dtype=np.int64) % n
            else:
                rng = self._rng(epoch, 1, u)
                full, rest = divmod(c, n)
                pos = np.concatenate([rng.permutation(n) for _ in range(full)] + [rng.permutation(n)[:rest]])
            if len(self._draws) >= 64:
                self._draws.pop(next(iter(self._draws)))
            self._draws[key] = pos.astype(np.int64, copy=False)
        return self._draws[key]

    def _rows(self, epoch: int, f: int) -> np.ndarray:
        """The c_f rows dataset f contributes to `epoch`, in epoch order (per_dataset and mixed)."""
        return self._draw(epoch, f, self.sets[f].n_samples, self.per_epoch[f])

    def _pool(self, sp: int) -> tuple[np.ndarray, np.ndarray]:
        """(files of species sp, where each file's cells start in its pool; last entry: the pool size)."""
        if sp not in self._pools:
            members = np.array(self.files_of(sp), np.int64)
            starts = np.concatenate([[0], np.cumsum([self.per_epoch[f] for f in members])]).astype(np.int64)
            self._pools[sp] = (members, starts)
        return self._pools[sp]

    def _mixed(self, epoch: int, sp: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, row) of positions start..stop of species sp's shuffled pool in `epoch`. The pool
        lists each file's c_f draws in file order: draw o of file f is row o mod n_f, its
        (o // n_f)-th pass over the file shuffled by a keyed permutation of its own."""
        members, starts = self._pool(sp)
        positions = np.arange(start, stop, dtype=np.int64)
        if self.shuffle:
            positions = permute(positions, starts[-1], key_of(self.seed, epoch, 2, sp))
        which = np.searchsorted(starts, positions, side="right") - 1
        files = members[which]
        offset = positions - starts[which]
        n = self._n_samples[files]
        passes, rows = np.divmod(offset, n)
        if self.shuffle:
            rows = permute(rows, n, key_of(self.seed, epoch, 1, files, passes))
        return files.astype(np.int32), rows

    def files_of(self, unit: int) -> tuple:
        """The datasets of a unit (ascending); its batches' panels are drawn over their genes."""
        if unit not in self._files:
            if self.batching == "mixed":
                self._files[unit] = tuple(f for f, s in enumerate(self.sets) if s.species == self.species[unit])
            else:
                self._files[unit] = tuple(int(f) for f in self.groups[unit].files)
        return self._files[unit]

    # ---- one batch ----------------------------------------------------------------------------
    def batch(self, g: int) -> PlannedBatch:
        epoch, k = divmod(int(g), self.batches_per_epoch)
        units, occurrence = self._order(epoch)
        unit, j = int(units[k]), int(occurrence[k])
        B = self.batch_size
        if self.batching == "per_dataset":
            rows = self._rows(epoch, unit)[j * B : (j + 1) * B]
            datasets = np.full(len(rows), unit, np.int32)
            species = self.sets[unit].species
        elif self.batching == "groups":
            group = self.groups[unit]
            pos = self._draw(epoch, unit, group.size, group.size)[j * B : (j + 1) * B]
            if group.file is not None:
                datasets, rows = np.full(len(pos), group.file, np.int32), pos
            else:
                datasets, rows = group.datasets[pos], group.rows[pos]
            species = group.species
        else:
            size = self._unit_cells[unit]
            datasets, rows = self._mixed(epoch, unit, min(j * B, size), min((j + 1) * B, size))
            species = self.species[unit]
        return PlannedBatch(int(g), epoch, k, species, datasets, rows, unit, self.files_of(unit))


def _limited(full: int, limit, key: str) -> int:
    """Batches per epoch under Lightning's limit_train_batches: a float in (0, 1] is a fraction of
    the epoch (rounded down), an int >= 1 a count (at most the epoch; the schema checked the range)."""
    if limit is None:
        return full
    n = int(full * limit) if isinstance(limit, float) else min(full, int(limit))
    if n < 1:
        raise DataError(
            key,
            f"is {limit}, which leaves no batch of the {full} of an epoch.",
            "Use a larger fraction, or a count of batches.",
        )
    return n


def _samples_per_epoch(sets: list[ShardSet], epoch_size: int | None, where: str) -> list[int]:
    """Cells each dataset contributes per epoch, from the `proportion` / `repeat` of its split entry."""
    has_prop = [("proportion" in s.weights) for s in sets]
    if any(has_prop) and not all(has_prop):
        missing = sorted({s.dataset_id.rsplit("/", 1)[0] for s, p in zip(sets, has_prop) if not p})
        raise DataError(
            f"{where}.split",
            f"gives `proportion` to some sources but not to {missing}.",
            "Give every source of the loader a proportion, or use `repeat` instead.",
        )
    for s in sets:
        for k in ("proportion", "repeat"):
            if k in s.weights and not float(s.weights[k]) >= 0:
                raise DataError(
                    f"{where}.split ({s.dataset_id})", f"has {k}={s.weights[k]}.", f"Use a non-negative number for {k}."
                )
    if not any(has_prop):
        return [int(round(float(s.weights.get("repeat", 1.0)) * s.n_samples)) for s in sets]
    total = int(epoch_size) if epoch_size else sum(s.n_samples for s in sets)
    # a source's share is split over its files in proportion to their sizes
    groups: dict[str, list[int]] = {}
    for f, s in enumerate(sets):
        groups.setdefault(s.dataset_id.rsplit("/", 1)[0], []).append(f)
    weight_sum = sum(float(sets[fs[0]].weights["proportion"]) for fs in groups.values())
    if weight_sum <= 0:
        raise DataError(
            f"{where}.split", "has proportions that sum to 0.", "Give at least one source a positive proportion."
        )
    out = [0] * len(sets)
    for fs in groups.values():
        share = total * float(sets[fs[0]].weights["proportion"]) / weight_sum
        size = sum(sets[f].n_samples for f in fs)
        for f in fs:
            out[f] = int(round(share * sets[f].n_samples / size)) if size else 0
    return out
