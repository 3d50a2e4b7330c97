"""Global batch g -> this rank's tokenized Batch, delivered by torch DataLoader workers in order.

`BatchMaker.make(g)` is a pure function of (seed, g): the plan picks the cells, the panels come
from a generator seeded with (seed, g), random gene sampling from (seed, g, view, position of the
cell in the global batch), the training view filters (filters.py) from (seed, g) and that position
(the token budget from this rank's cells). Worker w of W makes batches start + w, start + w + W,
...; the DataLoader hands them out round-robin, i.e. in order of g. So a loader's whole state is
the next g, and resuming at g in a fresh process, with any number of workers, gives the same
batches.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from concept_shard.errors import DataError, UserError

from ..make.batch import Batch, Layout, label_code
from ..make.filters import ViewFilters
from ..make.panels import PanelSampler
from ..make.tokenize import Cells, TokenSpec, normalized, pack, select_views, use_kernel
from ..order.plan import BatchPlan
from ..read.catalog import ShardSet
from ..read.decode import SampleBatch
from ..read.store import SampleStore
from .allocator import keep_freed_memory
from .handoff import Parcel, SlotRing, ring_for
from .workers import worker_init

STATE_VERSION = 1


@dataclass
class RankSlice:
    rank: int = 0
    world: int = 1


class BatchMaker:
    def __init__(
        self,
        name: str,
        sets: list[ShardSet],
        store: SampleStore,
        plan: BatchPlan,
        samplers: list[tuple[int, PanelSampler]],
        token_spec: TokenSpec,
        vocab_sizes: dict[str, int],
        species: list[str],
        obs_keys: list[str],
        ranks: RankSlice,
        seed: int,
        filters: ViewFilters | None = None,
    ):
        # samplers: [(first global batch, sampler)] in batch order; more than one with a panel curriculum
        self.name, self.sets, self.store, self.plan, self.samplers = name, sets, store, plan, samplers
        self.token_spec, self.vocab_sizes, self.species, self.obs_keys = token_spec, vocab_sizes, species, obs_keys
        self.ranks, self.seed = ranks, int(seed)
        self.filters = filters if filters is not None and filters.active else None
        self.store_index = np.array([store.index_of[s.dataset_id] for s in sets], np.int64)
        self._genes: dict[tuple, np.ndarray] = {}
        self._columns = ["n_counts", "row", "cell_id", *(f"obs.{k}" for k in obs_keys)]

    def genes_of(self, files: tuple) -> np.ndarray:
        """The genes a batch's panels are drawn over: its file's, or the union of the files of its
        group (mixed batches: of every file of the species)."""
        if len(files) == 1:
            return self.sets[files[0]].genes
        if files not in self._genes:
            if len(self._genes) >= 256:
                self._genes.pop(next(iter(self._genes)))
            self._genes[files] = np.unique(np.concatenate([self.sets[f].genes for f in files]))
        return self._genes[files]

    def make(self, g: int) -> Batch:
        pb = self.plan.batch(g)
        genes = self.genes_of(pb.files)
        sampler = next(smp for start, smp in reversed(self.samplers) if g >= start)
        panels = sampler.draw(np.random.default_rng([self.seed, int(g), 1]), genes, pb.species)
        # this rank's cells: a contiguous slice of the global batch (even split; uneven only for a last partial batch)
        positions = np.array_split(np.arange(len(pb.rows)), self.ranks.world)[self.ranks.rank]
        datasets, rows = pb.datasets[positions], pb.rows[positions]
        columns = self.store.get_batch(self.store_index[datasets], rows, self._columns, compiled=use_kernel())
        cells = Cells.from_batch(columns)
        values, keys = normalized(self.token_spec, cells)
        vocab_size = self.vocab_sizes[pb.species]
        rate = self.filters.drop_rate(self.seed, g) if self.filters is not None else 0.0
        rngs, keeps = [None, None], [None, None]
        for v in range(2):
            if self.token_spec.strategy in ("random", "random-nonzero"):
                rngs[v] = [np.random.default_rng([self.seed, int(g), 2, v, int(p)]) for p in positions]
            keeps[v] = ViewFilters.keep(self.seed, int(g), v, positions, rate) if rate > 0 else None
        views = select_views(
            self.token_spec, cells, values, keys, (panels.view1, panels.view2), vocab_size, rngs, keeps
        )
        if self.filters is not None:  # masked cells are delivered as <cls> alone
            lengths = np.stack([np.bincount(c, minlength=cells.n_cells) for c, _, _ in views])
            masked = self.filters.masked(lengths, (len(panels.view1), len(panels.view2)))
            if masked.any():
                views = [(c[~masked[c]], t[~masked[c]], x[~masked[c]]) for c, t, x in views]
        # a batch's arrays in two storages, per token and per cell: a DataLoader worker hands each
        # storage over separately, and a per-cell tensor kept after the batch (validation's
        # labels) holds only the per-cell one
        packed = pack(
            cells.n_cells,
            views,
            extra={"panel1": np.asarray(panels.view1, np.int64), "panel2": np.asarray(panels.view2, np.int64)},
        )
        t = packed.layout.tensors(packed.raw)
        n = cells.n_cells
        per_cell = {
            "species": np.full(n, self.species.index(pb.species), np.int64),
            "dataset": datasets,
            "row": columns.scalars["row"] if n else np.zeros(0, np.int64),
            **{f"labels.{k}": self._labels(columns, k, datasets) for k in self.obs_keys},
            "items_mask": (packed.view_lengths > 0).all(axis=0),
        }
        layout = Layout([(k, n, np.bool_ if k == "items_mask" else np.int64) for k in per_cell])
        raw = np.empty(layout.nbytes, np.uint8)
        for k, a in layout.arrays(raw).items():
            a[:] = per_cell[k]
        t.update(layout.tensors(raw))
        return Batch(
            tokens=t["tokens"],
            values=t["values"],
            positions=t["positions"],
            cu_seqlens=t["cu_seqlens"],
            max_seqlen=packed.max_seqlen,
            items_mask=t["items_mask"],
            species=t["species"],
            dataset=t["dataset"],
            row=t["row"],
            labels={k: t[f"labels.{k}"] for k in self.obs_keys},
            panels=(t["panel1"], t["panel2"]),
            panel_kinds=(panels.kind1, panels.kind2),
            index=int(g),
            epoch=pb.epoch,
            cell_ids=columns.strings["cell_id"] if n else [],
        )

    def _labels(self, columns: SampleBatch, key: str, datasets: np.ndarray) -> np.ndarray:
        """Label codes of the cells' obs values; for `dataset`, the file's own column, or else the
        file (its dataset id)."""
        values = columns.strings.get(f"obs.{key}") or [""] * len(datasets)
        if key == "dataset":
            values = [v or self.sets[d].dataset_id for v, d in zip(values, datasets.tolist())]
        return np.array([label_code(v) for v in values], np.int64)


class _BatchStream(IterableDataset):
    """Batches start + w, start + w + W, ... (worker w of W), up to `stop` (None: forever); through
    the ring's slots when there is one (a batch that does not go through crosses as itself)."""

    def __init__(self, maker: BatchMaker, start: int, stop: int | None, ring: SlotRing | None = None):
        self.maker, self.start, self.stop, self.ring = maker, start, stop, ring

    def __iter__(self):
        keep_freed_memory()  # this process makes the batches: it keeps their freed pages (allocator.py)
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        g = self.start + w
        while self.stop is None or g < self.stop:
            try:
                batch = self.maker.make(g)
            except UserError as err:  # crosses the worker boundary as data, raised again by Loader
                yield _Failure(type(err), err.where, err.problem, err.fix)
                return
            parcel = self.ring.pack(batch.tensors()) if self.ring is not None else None
            yield batch if parcel is None else _Handed(parcel, batch.rest())
            g += W


@dataclass
class _Handed:
    """A batch whose tensors wait in a hand-off slot."""

    parcel: Parcel
    rest: dict

    def open(self, ring: SlotRing) -> Batch:
        return Batch.from_tensors(ring.unpack(self.parcel), **self.rest)


@dataclass
class _Failure:
    """A user error met while making a batch, carried out of a DataLoader worker (which would turn
    it into a RuntimeError holding a traceback)."""

    kind: type
    where: str
    problem: str
    fix: str

    def error(self) -> UserError:
        return self.kind(self.where, self.problem, self.fix)


class Loader:
    """Iterates batches from its position on; `state_dict()` is what a checkpoint stores."""

    def __init__(
        self,
        maker: BatchMaker,
        num_workers: int = 0,
        stop: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        rewind: bool = False,
        handoff_slots: bool = True,
    ):
        # rewind: every pass starts at batch 0 (validation); else a pass continues where the last stopped
        # handoff_slots: workers hand batches over through shared slots (handoff.py), else the torch way
        self.maker, self.num_workers, self.stop, self.rewind = maker, int(num_workers), stop, rewind
        self.handoff_slots = handoff_slots
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.position = 0  # g of the next batch to deliver

    @property
    def plan(self) -> BatchPlan:
        return self.maker.plan

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("the training loader is endless; use plan.batches_per_epoch")
        return self.stop

    def __iter__(self):
        if self.rewind:
            self.position = 0
        ring = ring_for(self.num_workers, self.prefetch_factor) if self.handoff_slots else None
        stream = _BatchStream(self.maker, self.position, self.stop, ring)
        kwargs = dict(prefetch_factor=self.prefetch_factor) if self.num_workers > 0 else {}
        exiting = None
        if self.num_workers > 0:
            exiting = multiprocessing.get_context().Event()
            kwargs["worker_init_fn"] = functools.partial(worker_init, exiting, os.getpid())
            atexit.register(exiting.set)
        try:
            # own generator: creating the iterator must not draw from the global torch RNG, or a
            # resumed run's dropout would not match the uninterrupted one
            loader = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(self.maker.seed),
                **kwargs,
            )
            batches = iter(loader)
            for batch in batches:
                if isinstance(batch, _Failure):
                    raise batch.error()
                if isinstance(batch, _Handed):
                    batch = batch.open(ring)
                self.position = batch.index + 1
                yield batch
        finally:
            if exiting is not None:
                # done with these workers (exhausted, closed, or an error): let the SIGTERM that
                # shutting them down may send end them. A worker left waiting on a shard another
                # worker failed to prepare (a damaged one) otherwise ignored it, and the process
                # hung at exit joining it.
                exiting.set()
                atexit.unregister(exiting.set)
                batches = None  # the iterator shuts its workers down now
            if ring is not None:
                ring.close()

    def state_dict(self) -> dict:
        epoch, in_epoch = divmod(self.position, self.plan.batches_per_epoch)
        return {
            "version": STATE_VERSION,
            "loader": self.maker.name,
            "position": int(self.position),
            "epoch": int(epoch),
            "batch_in_epoch": int(in_epoch),
            "seed": self.maker.seed,
            "batch_size": self.plan.batch_size,
            "plan_digest": self.plan.digest,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state of {self.maker.name}",
                f"has version {state.get('version')}.",
                f"This code reads version {STATE_VERSION}; resume with the code that wrote it.",
            )
        if state.get("plan_digest") != self.plan.digest or state.get("seed") != self.maker.seed:
            raise DataError(
                f"loader state of {self.maker.name}",
                "was saved for another batch sequence (different files, sizes, weights, batch size, batching or seed).",
                "Resume with the same data config, or start a new run (initialize.create_new_run=True).",
            )
        self.position = int(state["position"])


__all__ = ["Batch", "BatchMaker", "Loader", "RankSlice"]
