"""The data side of a training run, built from the composed config: one training loader and the
configured validation loaders, all reading one sample store.

Which cells share a batch (`dataloader.<loader>.within_group_sampling`, groups.py, plan.py):
null = no grouping (a batch holds one species, many files); `dataset` = the input file (the
default: every batch from one file); obs keys = cells sharing those values (always within one
species). `dataset.<loader>.batching` (ours, older) is the same choice in other words:
`per_dataset` (the default) leaves it to `within_group_sampling`; `mixed` means "files may mix",
so it turns the plain `dataset` grouping into no grouping, keeps obs keys without `dataset`
(groups across files), and refuses a list that holds `dataset` and other keys (contradictory).

A validation loader takes `within_group_sampling` (unset or `train`), `batch_size`, `shuffle`,
`drop_last` (unset or null) from `dataloader.train`, and `max_tokens` from `dataset.train`, as
the reference's validation loaders do. The training-only view filters (filters.py) and
`model.training.limit_train_batches` apply to the training loader only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concept_config import Root
from concept_config.data import PanelKeys, ValLoaderKeys
from concept_shard.errors import DataError
from concept_shard.splits import TRAIN_SPLIT

from .deliver.loader import BatchMaker, Loader, RankSlice
from .deliver.workers import capped_workers
from .make.filters import ViewFilters
from .make.panels import DesignedPanel, PanelSampler, curriculum_specs, load_designed_panels
from .make.tokenize import TokenSpec
from .order.groups import FILE_KEY, file_groups, group_keys, obs_groups, pool_cut
from .order.plan import BatchPlan, NoBatch
from .read.catalog import Catalog, ShardSet
from .read.obs import column_codes
from .read.shm import check_free_shm
from .read.store import SampleStore


@dataclass
class LoaderSettings:
    """One loader's keys after inheritance: a validation loader takes the training loader's where
    it leaves them unset (see the module docstring)."""

    batch_size: int
    shuffle: bool
    drop_last: bool
    within_group_sampling: Any
    max_tokens: int
    num_groups: int | None
    sample_groups_equally: bool
    num_samples: int | None
    num_workers: int
    dataset: PanelKeys  # the loader's dataset keys (panels, batching, epoch_size)
    where_dl: str  # config keys, for messages
    where_ds: str


class DataModule:
    """The loaders of a run: built from the typed config's `datamodule` and `PATH` sections, the
    run's `seed` and `model.training.limit_train_batches`."""

    def __init__(self, cfg: Root, rank: int = 0, world_size: int = 1, log=print):
        self.dm, self.paths, self.log = cfg.datamodule, cfg.PATH, log
        self.seed, self.limit_train_batches = cfg.seed, cfg.model.training.limit_train_batches
        self.ranks = RankSlice(int(rank), int(world_size))
        dm = self.dm
        self.species = list(dm.species)
        self.obs_keys = list(dm.obs_keys)
        self.catalog = Catalog(self.paths, dm, log=log)
        self.train_sets = self.catalog.loader(TRAIN_SPLIT, "train")
        self.val_sets: dict[str, list[ShardSet]] = {}
        for name in dm.dataset.val:
            self.val_sets[name] = self.catalog.loader(f"datamodule.dataset.val.{name}.split", "val")
        for name, sets in self.val_sets.items():
            for key in self.obs_keys:  # kNN accuracy of a key no file has is null: say so once
                if all(key in s.obs_keys_absent for s in sets):
                    log(
                        f"[data] datamodule.obs_keys: '{key}' is a column of none of the files of validation "
                        f"loader {name}; its kNN accuracy will be null."
                    )
        workers = max([dm.dataloader.train.num_workers] + [v.num_workers for v in dm.dataloader.val.values()])
        check_free_shm(workers)
        self.store = SampleStore(self.catalog.all_sets(), cache_limit=dm.cache_limit)
        self._panels: dict[tuple[str, str], list[DesignedPanel]] = {}
        self._columns: dict[tuple[str, str], tuple] = {}  # (dataset id, obs key) -> (categories, codes)

    # ---- pieces -----------------------------------------------------------------------------
    def _designed(self, species: list[str], regex: str) -> dict[str, list[DesignedPanel]]:
        out = {}
        for sp in species:
            if (sp, regex) not in self._panels:
                self._panels[(sp, regex)] = load_designed_panels(
                    Path(self.paths.PANELS_PATH), self.catalog.vocab(sp), regex, log=self.log
                )
            out[sp] = self._panels[(sp, regex)]
        return out

    def _settings(self, name: str) -> LoaderSettings:
        """The loader's resolved keys: a validation loader inherits the training loader's where
        it leaves them unset (see the module docstring)."""
        train_dl, train_ds = self.dm.dataloader.train, self.dm.dataset.train
        if name == "train":
            return LoaderSettings(
                train_dl.batch_size,
                train_dl.shuffle,
                train_dl.drop_last,
                train_dl.within_group_sampling,
                train_ds.max_tokens,
                train_dl.num_groups,
                train_dl.sample_groups_equally,
                train_dl.num_samples,
                train_dl.num_workers,
                train_ds,
                "datamodule.dataloader.train",
                "datamodule.dataset.train",
            )
        dl, ds = self.dm.dataloader.val.get(name) or ValLoaderKeys(), self.dm.dataset.val[name]
        where_ds = f"datamodule.dataset.val.{name}"

        def inherit(own, trains):
            return trains if own is None else own

        wgs = train_dl.within_group_sampling if dl.within_group_sampling == "train" else dl.within_group_sampling
        return LoaderSettings(
            inherit(dl.batch_size, train_dl.batch_size),
            inherit(dl.shuffle, train_dl.shuffle),
            inherit(dl.drop_last, train_dl.drop_last),
            wgs,
            inherit(ds.max_tokens, train_ds.max_tokens),
            dl.num_groups,
            dl.sample_groups_equally,
            dl.num_samples,
            dl.num_workers,
            ds,
            f"datamodule.dataloader.val.{name}",
            where_ds,
        )

    def _grouping(self, st: LoaderSettings) -> tuple[str, list[str] | None]:
        """(plan batching, obs keys) from within_group_sampling and batching."""
        where = f"{st.where_dl}.within_group_sampling"
        keys = group_keys(st.within_group_sampling, where)
        if st.dataset.batching == "mixed":
            if keys is None or keys == [FILE_KEY]:
                return "mixed", None
            if FILE_KEY in keys:
                raise DataError(
                    f"{st.where_ds}.batching",
                    f"is 'mixed' (a batch may mix files) while {where} "
                    f"is {keys}, whose `dataset` keeps every batch in one file: they contradict.",
                    "Drop `dataset` from within_group_sampling, or set batching: per_dataset.",
                )
            return "groups", keys
        if keys is None:
            return "mixed", None
        return ("per_dataset" if keys == [FILE_KEY] else "groups"), keys

    def _codes(self, sets: list[ShardSet], where: str):
        def codes_of(f: int, key: str):
            s = sets[f]
            if (s.dataset_id, key) not in self._columns:
                self._columns[(s.dataset_id, key)] = column_codes(
                    self.catalog.reader(s), key, where, cache_dir=s.directory
                )
            return self._columns[(s.dataset_id, key)]

        return codes_of

    def _node_reads_first(self, sets: list[ShardSet], keys: list[str], where: str) -> None:
        """Under several processes, one per node reads the grouping columns (decompressing every
        shard) and caches them next to the shards; the others wait, then read the cache."""
        import torch.distributed as dist

        if self.ranks.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        if int(os.environ.get("LOCAL_RANK", self.ranks.rank)) == 0:
            codes_of = self._codes(sets, where)
            for f in range(len(sets)):
                for key in keys:
                    if key != FILE_KEY:
                        codes_of(f, key)
        dist.barrier()

    def _plan(self, name: str, sets: list[ShardSet], st: LoaderSettings, seed: int, limit=None) -> BatchPlan:
        if st.drop_last and st.batch_size % self.ranks.world:
            raise DataError(
                f"{st.where_dl}.batch_size",
                f"is {st.batch_size}, which {self.ranks.world} ranks cannot share evenly.",
                f"Use a multiple of the world size {self.ranks.world} (it is the GLOBAL batch).",
            )
        batching, keys = self._grouping(st)
        cuts = {k: getattr(st, k) for k in ("num_groups", "sample_groups_equally") if getattr(st, k)}
        if name == "train" and st.num_samples is not None:
            cuts["num_samples"] = st.num_samples
        common = dict(shuffle=st.shuffle, drop_last=st.drop_last, where=st.where_ds, limit=limit)
        if batching == "mixed":
            if cuts:
                raise DataError(
                    f"{st.where_dl}.{next(iter(cuts))}",
                    "cuts the groups of within_group_sampling, but "
                    "this loader does not group its cells (within_group_sampling null or batching mixed).",
                    "Set within_group_sampling (e.g. dataset), or remove it (model.training."
                    "limit_train_batches shortens a training epoch).",
                )
            return BatchPlan(sets, st.batch_size, seed, batching="mixed", epoch_size=st.dataset.epoch_size, **common)
        # the pool cut to num_samples (a validation loader's num_samples also caps its pass, val_loaders)
        num_samples = st.num_samples
        weighted = sorted({s.dataset_id.rsplit("/", 1)[0] for s in sets if s.weights.keys() & {"repeat", "proportion"}})
        if weighted:
            if batching == "groups" or cuts:
                what = f"within_group_sampling {keys}" if batching == "groups" else ", ".join(cuts)
                raise DataError(
                    f"{st.where_ds}.split",
                    f"gives `repeat`/`proportion` to {weighted}, which do not "
                    f"combine with {what} (groups are sampled as they are, as in the reference).",
                    "Remove the weights, or group by `dataset` alone without num_samples/num_groups/"
                    "sample_groups_equally.",
                )
            num_samples = None
        if batching == "per_dataset" and not cuts and num_samples is None:
            return BatchPlan(
                sets, st.batch_size, seed, batching="per_dataset", epoch_size=st.dataset.epoch_size, **common
            )
        return self._group_plan(sets, st, seed, batching, keys, num_samples, common)

    def _group_plan(
        self, sets: list[ShardSet], st: LoaderSettings, seed: int, batching: str, keys, num_samples, common: dict
    ) -> BatchPlan:
        """A plan over groups cut to the loader's num_samples / num_groups / sample_groups_equally
        (files are groups too when per-dataset batches are cut)."""
        where = f"{st.where_dl}.within_group_sampling"
        if batching != "per_dataset":
            self._node_reads_first(sets, keys, where)
        groups = (
            file_groups(sets)
            if batching == "per_dataset"
            else obs_groups(sets, keys, self._codes(sets, where), where, log=self.log)
        )
        cut = pool_cut(
            groups,
            st.batch_size,
            seed,
            num_samples,
            st.num_groups,
            st.sample_groups_equally,
            total_cells=sum(s.n_samples for s in sets),
        )
        if batching == "per_dataset" and all(a is b for a, b in zip(cut, groups)) and len(cut) == len(groups):
            return BatchPlan(
                sets, st.batch_size, seed, batching="per_dataset", epoch_size=st.dataset.epoch_size, **common
            )
        spec = {
            "keys": keys,
            "num_samples": num_samples,
            "num_groups": st.num_groups,
            "sample_groups_equally": st.sample_groups_equally,
        }
        if not cut:
            raise DataError(
                where,
                f"is {keys}: no cell of the loader has a value for every key.",
                "Group by keys the files have (their cells' values may not be empty).",
            )
        return BatchPlan(sets, st.batch_size, seed, batching="groups", groups=cut, group_spec=spec, **common)

    def _maker(
        self,
        name: str,
        sets: list[ShardSet],
        st: LoaderSettings,
        seed: int,
        limit=None,
        filters: ViewFilters | None = None,
    ) -> BatchMaker:
        plan = self._plan(name, sets, st, seed, limit)
        species = sorted({s.species for s in sets})
        designed = self._designed(species, st.dataset.panel_filter_regex)
        samplers = [
            (start, PanelSampler(spec, designed, st.where_ds))
            for start, spec in curriculum_specs(st.dataset, st.where_ds)
        ]
        token_spec = TokenSpec(
            max_tokens=st.max_tokens, normalization=self.dm.normalization, strategy=self.dm.gene_sampling_strategy
        )
        vocab_sizes = {sp: self.catalog.vocab(sp).size for sp in species}
        return BatchMaker(
            name,
            sets,
            self.store,
            plan,
            samplers,
            token_spec,
            vocab_sizes,
            self.species,
            self.obs_keys,
            self.ranks,
            seed,
            filters=filters,
        )

    # ---- loaders ----------------------------------------------------------------------------
    def train_loader(self) -> Loader:
        filters = ViewFilters.from_keys(self.dm.dataset.train)
        st = self._settings("train")
        maker = self._maker("train", self.train_sets, st, self.seed, limit=self.limit_train_batches, filters=filters)
        self._say_unused(maker.plan)
        workers = capped_workers(st.num_workers, f"{st.where_dl}.num_workers", self.log)
        return Loader(maker, num_workers=workers)

    def _say_unused(self, plan: BatchPlan) -> None:
        """One line when an epoch leaves cells out: per-file (or per-group) batches drop each
        unit's last partial batch, which for corpora of small files is a large share."""
        left, total, empty = plan.unused()
        if left == 0 or plan.batching == "mixed":
            return
        unit = "file" if plan.batching == "per_dataset" else "group"
        none = f"; {empty} {unit}(s) hold fewer cells than one batch and are never used" if empty else ""
        self.log(
            f"[data] each training epoch leaves {left:,} of {total:,} cells ({100 * left / total:.1f}%) unused: "
            f"a batch holds the cells of one {unit} and each {unit}'s last partial batch of "
            f"< {plan.batch_size} is dropped, as in the reference{none}. "
            "datamodule.dataloader.train.drop_last=false uses them in smaller last batches."
            + (
                f" (Counted before model.training.limit_train_batches, which keeps {plan.batches_per_epoch:,} "
                f"of the epoch's {plan.full_epoch:,} batches.)"
                if plan.batches_per_epoch != plan.full_epoch
                else ""
            )
        )

    def val_loaders(self) -> dict[str, Loader]:
        """Each with a fixed cell budget (`num_samples`) and a fixed order and panels: the same
        `datamodule.val_seed` in every run, so validation numbers are comparable across runs."""
        out = {}
        for name, sets in self.val_sets.items():
            st = self._settings(name)
            try:
                maker = self._maker(name, sets, st, self.dm.val_seed)
            except NoBatch as err:  # as scConcept's empty loader: no batches, and here a word
                self.log(f"[data] validation loader {name} is skipped ({err.where}: {err.problem} {err.fix})")
                continue
            n_batches = maker.plan.batches_per_epoch
            if st.num_samples is not None:
                n_batches = max(1, min(n_batches, st.num_samples // maker.plan.batch_size))
            workers = capped_workers(st.num_workers, f"{st.where_dl}.num_workers", self.log)
            out[name] = Loader(maker, num_workers=workers, stop=n_batches, rewind=True)
        return out
