"""The data side of a training run, built from the composed config: one training loader and the
configured validation loaders, all reading one sample store."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from concept_shard.errors import DataError
from concept_shard.splits import TRAIN_SPLIT

from .catalog import Catalog, ShardSet
from .loader import BatchMaker, Loader, RankSlice
from .panels import DesignedPanel, PanelSampler, curriculum_specs, load_designed_panels
from .plan import BatchPlan
from .shm import check_free_shm
from .store import SampleStore
from .tokenize import TokenSpec


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
        workers = max([int(OmegaConf.select(dm, "dataloader.train.num_workers", default=0) or 0)]
                      + [int(v.get("num_workers", 0) or 0) for v in (OmegaConf.select(dm, "dataloader.val") or {}).values()])
        check_free_shm(workers)
        self.store = SampleStore(self.catalog.all_sets(), cache_limit=dm.get("cache_limit"))
        self._panels: dict[tuple[str, str], list[DesignedPanel]] = {}

    # ---- pieces -----------------------------------------------------------------------------
    def _designed(self, species: list[str], regex: str) -> dict[str, list[DesignedPanel]]:
        out = {}
        for sp in species:
            if (sp, regex) not in self._panels:
                self._panels[(sp, regex)] = load_designed_panels(Path(self.cfg.PATH.PANELS_PATH), self.catalog.vocab(sp),
                                                                 regex, log=self.log)
            out[sp] = self._panels[(sp, regex)]
        return out

    def _maker(self, name: str, where: str, sets: list[ShardSet], ds_cfg, dl_cfg, seed: int, shuffle: bool) -> BatchMaker:
        dm = self.cfg.datamodule
        batch_size = int(dl_cfg.get("batch_size", 128))
        drop_last = bool(dl_cfg.get("drop_last", True))
        if drop_last and batch_size % self.ranks.world:
            raise DataError(f"datamodule.dataloader.{name}.batch_size",
                            f"is {batch_size}, which {self.ranks.world} ranks cannot share evenly.",
                            f"Use a multiple of the world size {self.ranks.world} (it is the GLOBAL batch).")
        plan = BatchPlan(sets, batch_size, seed, batching=str(ds_cfg.get("batching", "per_dataset")),
                         shuffle=shuffle, drop_last=drop_last, epoch_size=ds_cfg.get("epoch_size"), where=where)
        species = sorted({s.species for s in sets})
        designed = self._designed(species, str(ds_cfg.get("panel_filter_regex", ".*")))
        samplers = [(start, PanelSampler(spec, designed, where)) for start, spec in curriculum_specs(ds_cfg, where)]
        token_spec = TokenSpec(max_tokens=int(ds_cfg.get("max_tokens", 1000)),
                               normalization=str(dm.get("normalization", "raw")),
                               strategy=str(dm.get("gene_sampling_strategy", "top-nonzero")))
        vocab_sizes = {sp: self.catalog.vocab(sp).size for sp in species}
        return BatchMaker(name, sets, self.store, plan, samplers, token_spec, vocab_sizes, self.species,
                          self.obs_keys, self.ranks, seed)

    # ---- loaders ----------------------------------------------------------------------------
    def train_loader(self) -> Loader:
        dm = self.cfg.datamodule
        dl = OmegaConf.select(dm, "dataloader.train") or OmegaConf.create({})
        seed = int(OmegaConf.select(self.cfg, "seed", default=0))
        maker = self._maker("train", "datamodule.dataset.train", self.train_sets, dm.dataset.train, dl, seed,
                            shuffle=bool(dl.get("shuffle", True)))
        return Loader(maker, num_workers=int(dl.get("num_workers", 0)))

    def val_loaders(self) -> dict[str, Loader]:
        """Each with a fixed cell budget (`num_samples`) and a fixed order and panels: the same
        `datamodule.val_seed` in every run, so validation numbers are comparable across runs."""
        dm = self.cfg.datamodule
        seed = int(dm.get("val_seed", 0))
        out = {}
        for name, sets in self.val_sets.items():
            ds_cfg = dm.dataset.val[name]
            dl = OmegaConf.select(dm, f"dataloader.val.{name}") or OmegaConf.create({})
            maker = self._maker(name, f"datamodule.dataset.val.{name}", sets, ds_cfg, dl, seed, shuffle=True)
            budget = dl.get("num_samples")
            n_batches = maker.plan.batches_per_epoch
            if budget is not None:
                n_batches = max(1, min(n_batches, int(budget) // maker.plan.batch_size))
            out[name] = Loader(maker, num_workers=int(dl.get("num_workers", 0)), stop=n_batches, rewind=True)
        return out
