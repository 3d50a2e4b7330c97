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
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from concept_shard.errors import DataError
from concept_shard.splits import TRAIN_SPLIT

from .catalog import Catalog, ShardSet
from .filters import FILTER_KEYS, ViewFilters
from .groups import FILE_KEY, file_groups, group_keys, obs_groups, pool_cut
from .loader import BatchMaker, Loader, RankSlice
from .obs import column_codes
from .panels import DesignedPanel, PanelSampler, curriculum_specs, load_designed_panels
from .plan import BatchPlan
from .shm import check_free_shm
from .store import SampleStore
from .tokenize import TokenSpec
from .workers import capped_workers


class DataModule:
    def __init__(self, cfg: DictConfig, rank: int = 0, world_size: int = 1, log=print):
        self.cfg, self.log = cfg, log
        self.ranks = RankSlice(int(rank), int(world_size))
        dm = cfg.datamodule
        self.species = list(dm.species)
        self.obs_keys = list(dm.get("obs_keys") or [])
        self.catalog = Catalog(cfg, log=log)
        self.train_sets = self.catalog.loader(TRAIN_SPLIT, "train")
        self.val_sets: dict[str, list[ShardSet]] = {}
        for name in (OmegaConf.select(dm, "dataset.val") or {}):
            self.val_sets[name] = self.catalog.loader(f"datamodule.dataset.val.{name}.split", "val")
        for name, sets in self.val_sets.items():
            for key in self.obs_keys:      # kNN accuracy of a key no file has is null: say so once
                if all(key in s.obs_keys_absent for s in sets):
                    log(f"[data] datamodule.obs_keys: '{key}' is a column of none of the files of validation "
                        f"loader {name}; its kNN accuracy will be null.")
        workers = max([int(dm.dataloader.train.num_workers)] + [int(v.num_workers) for v in dm.dataloader.val.values()])
        check_free_shm(workers)
        self.store = SampleStore(self.catalog.all_sets(), cache_limit=dm.cache_limit)
        self._panels: dict[tuple[str, str], list[DesignedPanel]] = {}
        self._columns: dict[tuple[str, str], tuple] = {}     # (dataset id, obs key) -> (categories, codes)

    # ---- pieces -----------------------------------------------------------------------------
    def _designed(self, species: list[str], regex: str) -> dict[str, list[DesignedPanel]]:
        out = {}
        for sp in species:
            if (sp, regex) not in self._panels:
                self._panels[(sp, regex)] = load_designed_panels(Path(self.cfg.PATH.PANELS_PATH), self.catalog.vocab(sp),
                                                                 regex, log=self.log)
            out[sp] = self._panels[(sp, regex)]
        return out

    def _settings(self, name: str) -> dict:
        """The loader's resolved keys: a validation loader inherits the training loader's where
        it leaves them unset (see the module docstring)."""
        dm = self.cfg.datamodule
        empty = OmegaConf.create({})
        train_dl = OmegaConf.select(dm, "dataloader.train") or empty
        train_ds = OmegaConf.select(dm, "dataset.train") or empty
        train = {"batch_size": train_dl.batch_size, "shuffle": train_dl.shuffle, "drop_last": train_dl.drop_last,
                 "within_group_sampling": train_dl.within_group_sampling, "max_tokens": train_ds.max_tokens}
        if name == "train":
            dl, ds, out = train_dl, train_ds, dict(train)
            where_dl, where_ds = "datamodule.dataloader.train", "datamodule.dataset.train"
        else:
            dl = OmegaConf.select(dm, f"dataloader.val.{name}") or empty
            ds = dm.dataset.val[name]
            where_dl, where_ds = f"datamodule.dataloader.val.{name}", f"datamodule.dataset.val.{name}"
            out = {k: (dl.get(k) if dl.get(k) is not None else v) for k, v in train.items() if k != "max_tokens"}
            wgs = dl.within_group_sampling
            out["within_group_sampling"] = train["within_group_sampling"] if wgs == "train" else wgs
            out["max_tokens"] = ds.get("max_tokens") if ds.get("max_tokens") is not None else train["max_tokens"]
            on = [k for k in FILTER_KEYS if ds.get(k) is not None]
            if on:
                raise DataError(f"{where_ds}.{on[0]}", f"is set on a validation loader ({', '.join(on)}); the view "
                                "filters apply to the training loader only (as in the reference).",
                                "Remove it there; set it under datamodule.dataset.train to filter training views.")
        out.update(num_groups=dl.get("num_groups"), sample_groups_equally=bool(dl.get("sample_groups_equally") or False),
                   num_samples=dl.get("num_samples"), where_dl=where_dl, where_ds=where_ds, ds=ds,
                   batching=ds.batching)
        return out

    def _grouping(self, st: dict) -> tuple[str, list[str] | None]:
        """(plan batching, obs keys) from within_group_sampling and batching."""
        where = f"{st['where_dl']}.within_group_sampling"
        keys = group_keys(st["within_group_sampling"], where)
        batching = st["batching"] if st["batching"] is not None else "per_dataset"
        if batching not in ("per_dataset", "mixed"):
            raise DataError(f"{st['where_ds']}.batching", f"is '{batching}'.",
                            "Use per_dataset or mixed (or within_group_sampling, the reference's key).")
        if batching == "mixed":
            if keys is None or keys == [FILE_KEY]:
                return "mixed", None
            if FILE_KEY in keys:
                raise DataError(f"{st['where_ds']}.batching", f"is 'mixed' (a batch may mix files) while {where} "
                                f"is {keys}, whose `dataset` keeps every batch in one file: they contradict.",
                                "Drop `dataset` from within_group_sampling, or set batching: per_dataset.")
            return "groups", keys
        if keys is None:
            return "mixed", None
        return ("per_dataset" if keys == [FILE_KEY] else "groups"), keys

    def _codes(self, sets: list[ShardSet], where: str):
        def codes_of(f: int, key: str):
            s = sets[f]
            if (s.dataset_id, key) not in self._columns:
                self._columns[(s.dataset_id, key)] = column_codes(self.catalog.reader(s), key, where,
                                                                    cache_dir=s.directory)
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

    def _plan(self, name: str, sets: list[ShardSet], st: dict, seed: int, limit=None) -> BatchPlan:
        batch_size, drop_last = int(st["batch_size"]), bool(st["drop_last"])
        where_dl, where_ds = st["where_dl"], st["where_ds"]
        if drop_last and batch_size % self.ranks.world:
            raise DataError(f"{where_dl}.batch_size",
                            f"is {batch_size}, which {self.ranks.world} ranks cannot share evenly.",
                            f"Use a multiple of the world size {self.ranks.world} (it is the GLOBAL batch).")
        batching, keys = self._grouping(st)
        cuts = {k: st[k] for k in ("num_groups", "sample_groups_equally") if st[k]}
        if name == "train" and st["num_samples"] is not None:
            cuts["num_samples"] = st["num_samples"]
        common = dict(shuffle=bool(st["shuffle"]), drop_last=drop_last, where=where_ds, limit=limit)
        if batching == "mixed":
            if cuts:
                raise DataError(f"{where_dl}.{next(iter(cuts))}", "cuts the groups of within_group_sampling, but this "
                                "loader does not group its cells (within_group_sampling null or batching mixed).",
                                "Set within_group_sampling (e.g. dataset), or remove it (model.training."
                                "limit_train_batches shortens a training epoch).")
            return BatchPlan(sets, batch_size, seed, batching="mixed", epoch_size=st["ds"].get("epoch_size"), **common)
        # the pool cut to num_samples (a validation loader's num_samples also caps its pass, val_loaders)
        num_samples = st["num_samples"]
        weighted = sorted({s.dataset_id.rsplit("/", 1)[0] for s in sets if s.weights.keys() & {"repeat", "proportion"}})
        if weighted:
            if batching == "groups" or cuts:
                what = f"within_group_sampling {keys}" if batching == "groups" else ", ".join(cuts)
                raise DataError(f"{where_ds}.split", f"gives `repeat`/`proportion` to {weighted}, which do not "
                                f"combine with {what} (groups are sampled as they are, as in the reference).",
                                "Remove the weights, or group by `dataset` alone without num_samples/num_groups/"
                                "sample_groups_equally.")
            num_samples = None
        if batching == "per_dataset" and not cuts and num_samples is None:
            return BatchPlan(sets, batch_size, seed, batching="per_dataset", epoch_size=st["ds"].get("epoch_size"), **common)
        if batching != "per_dataset":
            self._node_reads_first(sets, keys, f"{where_dl}.within_group_sampling")
        groups = file_groups(sets) if batching == "per_dataset" else \
            obs_groups(sets, keys, self._codes(sets, f"{where_dl}.within_group_sampling"),
                       f"{where_dl}.within_group_sampling", log=self.log)
        cut = pool_cut(groups, batch_size, seed, num_samples, st["num_groups"], st["sample_groups_equally"],
                       total_cells=sum(s.n_samples for s in sets))
        if batching == "per_dataset" and all(a is b for a, b in zip(cut, groups)) and len(cut) == len(groups):
            return BatchPlan(sets, batch_size, seed, batching="per_dataset", epoch_size=st["ds"].get("epoch_size"), **common)
        spec = {"keys": keys, "num_samples": num_samples, "num_groups": st["num_groups"],
                "sample_groups_equally": st["sample_groups_equally"]}
        if not cut:
            raise DataError(f"{where_dl}.within_group_sampling", f"is {keys}: no cell of the loader has a value for "
                            "every key.", "Group by keys the files have (their cells' values may not be empty).")
        return BatchPlan(sets, batch_size, seed, batching="groups", groups=cut, group_spec=spec, **common)

    def _maker(self, name: str, sets: list[ShardSet], st: dict, seed: int, limit=None,
               filters: ViewFilters | None = None) -> BatchMaker:
        dm, ds_cfg, where = self.cfg.datamodule, st["ds"], st["where_ds"]
        plan = self._plan(name, sets, st, seed, limit)
        species = sorted({s.species for s in sets})
        designed = self._designed(species, str(ds_cfg.panel_filter_regex))
        samplers = [(start, PanelSampler(spec, designed, where)) for start, spec in curriculum_specs(ds_cfg, where)]
        token_spec = TokenSpec(max_tokens=int(st["max_tokens"]),
                               normalization=str(dm.normalization),
                               strategy=str(dm.gene_sampling_strategy))
        vocab_sizes = {sp: self.catalog.vocab(sp).size for sp in species}
        return BatchMaker(name, sets, self.store, plan, samplers, token_spec, vocab_sizes, self.species,
                          self.obs_keys, self.ranks, seed, filters=filters)

    # ---- loaders ----------------------------------------------------------------------------
    def train_loader(self) -> Loader:
        dm = self.cfg.datamodule
        dl = OmegaConf.select(dm, "dataloader.train") or OmegaConf.create({})
        seed = int(OmegaConf.select(self.cfg, "seed", default=0))
        limit = OmegaConf.select(self.cfg, "model.training.limit_train_batches", default=None)
        filters = ViewFilters.from_config(dm.dataset.train, "datamodule.dataset.train")
        maker = self._maker("train", self.train_sets, self._settings("train"), seed, limit=limit, filters=filters)
        self._say_unused(maker.plan)
        workers = capped_workers(dl.num_workers, "datamodule.dataloader.train.num_workers", self.log)
        return Loader(maker, num_workers=workers)

    def _say_unused(self, plan: BatchPlan) -> None:
        """One line when an epoch leaves cells out: per-file (or per-group) batches drop each
        unit's last partial batch, which for corpora of small files is a large share."""
        left, total, empty = plan.unused()
        if left == 0 or plan.batching == "mixed":
            return
        unit = "file" if plan.batching == "per_dataset" else "group"
        none = f"; {empty} {unit}(s) hold fewer cells than one batch and are never used" if empty else ""
        self.log(f"[data] each training epoch leaves {left:,} of {total:,} cells ({100 * left / total:.1f}%) unused: "
                 f"a batch holds the cells of one {unit} and each {unit}'s last partial batch of "
                 f"< {plan.batch_size} is dropped, as in the reference{none}. "
                 "datamodule.dataloader.train.drop_last=false uses them in smaller last batches."
                 + (f" (Counted before model.training.limit_train_batches, which keeps {plan.batches_per_epoch:,} "
                    f"of the epoch's {plan.full_epoch:,} batches.)" if plan.batches_per_epoch != plan.full_epoch else ""))

    def val_loaders(self) -> dict[str, Loader]:
        """Each with a fixed cell budget (`num_samples`) and a fixed order and panels: the same
        `datamodule.val_seed` in every run, so validation numbers are comparable across runs."""
        dm = self.cfg.datamodule
        seed = int(dm.val_seed)
        out = {}
        for name, sets in self.val_sets.items():
            dl = OmegaConf.select(dm, f"dataloader.val.{name}") or OmegaConf.create({})
            maker = self._maker(name, sets, self._settings(name), seed)
            budget = dl.get("num_samples")
            n_batches = maker.plan.batches_per_epoch
            if budget is not None:
                n_batches = max(1, min(n_batches, int(budget) // maker.plan.batch_size))
            workers = capped_workers(dl.num_workers, f"datamodule.dataloader.val.{name}.num_workers", self.log)
            out[name] = Loader(maker, num_workers=workers, stop=n_batches, rewind=True)
        return out
