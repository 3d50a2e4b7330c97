"""scConcept's Python API names over ours (docs/migrating.md): code written for sc-concept runs here
with its import changed to `from concept_train.scconcept import scConcept`.

    model = scConcept(cache_dir="./cache/")
    model.load_config_and_model("corpus40M-model30M")         # ./cache/corpus40M-model30M/, no download
    embs = model.extract_embeddings(adata)["cls_cell_emb"]
    model.train(adata, max_steps=200)                         # adaptation: a new run, then its model

The model is a `LoadedModel` (`model.loaded`), embeddings come from `embed_rows` (float32, whole
cells as scConcept's `max_tokens` says), adaptation from `concept_train.adapt.train`. Nothing is
downloaded: a model name is a directory under `cache_dir` (scConcept's hub layout), fetched there
beforehand on a machine with network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from concept_shard.errors import TrainError
from concept_shard.source import AnnDataObjectSource
from concept_shard.vocabulary import mapping_file

from ..embedding import embed_rows
from ..trainer.checkpoint import LoadedModel, load_model
from . import model_dir


class scConcept:  # noqa: N801 - scConcept's own class name
    def __init__(self, cfg=None, repo_id: str = "theislab/scConcept", cache_dir: str = "./cache/", work_dir=None):
        """`cfg` is accepted for scConcept's signature and used only by `train()` from scratch (its
        PATH.GENE_MAPPINGS_PATH); `work_dir`: where `train()` shards and trains (default:
        `cache_dir/adaptation`)."""
        self.repo_id, self.cache_dir, self.cfg = repo_id, Path(cache_dir), cfg
        self.work_dir = Path(work_dir) if work_dir is not None else self.cache_dir / "adaptation"
        self.loaded: LoadedModel | None = None

    # ---- loading -----------------------------------------------------------------------------
    def load_config_and_model(
        self,
        model_name: str | None = None,
        config=None,
        model_path=None,
        gene_mappings_path=None,
        panels_dir=None,
        pretrained_vocabulary_path=None,
        device=None,
        trust_pickle: bool = False,
    ) -> scConcept:
        """A model by name (a directory `cache_dir/<model_name>` in scConcept's layout), a model or
        run directory as `model_path`, or its files one by one (`config`, `model_path`,
        `gene_mappings_path`), as scConcept takes them. `panels_dir` and `pretrained_vocabulary_path`
        are accepted and need no reading: the checkpoint holds the pretrained tables."""
        if model_name is not None:
            home = self.cache_dir / model_name
            if not model_dir.is_model_dir(home):
                raise TrainError(
                    home,
                    f"holds no scConcept model '{model_name}' (model.ckpt, config.yaml, gene_mappings/): "
                    "models are not downloaded here.",
                    f"Copy {self.repo_id}/{model_name} from its hub into {home} on a machine with network, "
                    "or pass model_path=.",
                )
            self.loaded = model_dir.load(home, device=device, trust_pickle=trust_pickle)
        elif config is not None or gene_mappings_path is not None:
            self.loaded = model_dir.load(
                config=config,
                model_path=model_path,
                gene_mappings_path=gene_mappings_path,
                device=device,
                trust_pickle=trust_pickle,
            )
        elif model_path is not None:
            self.loaded = load_model(model_path, device=device, trust_pickle=trust_pickle)
        else:
            raise TrainError(
                "load_config_and_model()",
                "was given no model.",
                "Pass model_name=, model_path= (a model or run directory), or config=, model_path= and "
                "gene_mappings_path=.",
            )
        self.cfg = self.loaded.cfg
        return self

    def _check_model_loaded(self) -> LoadedModel:
        if self.loaded is None:
            raise TrainError("scConcept", "has no model loaded.", "Call load_config_and_model() first.")
        return self.loaded

    @property
    def model(self):
        return self._check_model_loaded().model

    @property
    def species(self) -> list[str]:
        return sorted(self._check_model_loaded().vocabs)

    # ---- genes ------------------------------------------------------------------------------
    def get_gene_name_to_id_mapping(self, species: str) -> dict[str, str]:
        """{gene name: gene id} from the species' token mapping (first of case-insensitive duplicates)."""
        loaded = self._check_model_loaded()
        if species not in loaded.vocabs:
            raise TrainError(
                f"species '{species}'", "has no gene mapping in this model.", f"Use one of {self.species}."
            )
        table = pd.read_csv(
            mapping_file(Path(loaded.cfg.PATH.GENE_MAPPINGS_PATH), species), dtype=str, keep_default_na=False
        )
        table = table[(table["gene_name"] != "") & (table["gene_id"] != "")]
        table = table[~table["gene_name"].str.casefold().duplicated(keep="first")]
        return dict(zip(table["gene_name"], table["gene_id"]))

    def map_gene_names_to_ids(self, species: str, gene_names) -> list:
        """Gene names -> gene ids, case-insensitively; nan where a name is unknown."""
        folded = {name.casefold(): gid for name, gid in self.get_gene_name_to_id_mapping(species).items()}
        return [folded.get(str(name).casefold(), np.nan) for name in gene_names]

    # ---- embeddings -------------------------------------------------------------------------
    def extract_embeddings(
        self,
        adata,
        species: str | None = None,
        gene_id_column: str | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        gene_sampling_strategy: str | None = None,
        use_learnable_embs: bool = True,
        return_type: str = "numpy",
        num_workers: int = 0,
    ) -> dict:
        """{"cls_cell_emb": [n_cells, d]} as scConcept's, in float32 (no bf16 autocast). Counts from
        `adata.raw` when set, else `X`; `max_tokens` by default the model's training value.
        `num_workers` is accepted: the rows are read in this process."""
        loaded = self._check_model_loaded()
        if gene_sampling_strategy not in (None, "top-nonzero"):
            raise TrainError(
                f"gene_sampling_strategy={gene_sampling_strategy!r}",
                "is not one embeddings are made with here.",
                "Use top-nonzero (scConcept's default: the cell's nonzero genes by value).",
            )
        if return_type not in ("numpy", "torch"):
            raise TrainError(f"return_type={return_type!r}", "is neither numpy nor torch.", "Use numpy or torch.")
        z, _ = embed_rows(
            loaded,
            AnnDataObjectSource(adata, gene_id_column),
            "AnnData object",
            species=species,
            gene_id_column=gene_id_column,
            batch_size=batch_size,
            max_tokens=max_tokens or loaded.cfg.datamodule.dataset.train.max_tokens,
            use_learnable_embs=use_learnable_embs,
        )
        return {"cls_cell_emb": torch.from_numpy(z) if return_type == "torch" else z}

    # ---- adaptation -------------------------------------------------------------------------
    def train(self, adata_list, species=None, max_steps: int | None = None, batch_size: int | None = None):
        """Adapt the loaded model to `adata_list` (AnnData objects and/or .h5ad paths) for `max_steps`
        steps (default 200) in a new run under `work_dir`; the adapted model becomes this one's.
        Without a loaded model it trains from scratch with `cfg`'s PATH.GENE_MAPPINGS_PATH."""
        from ..adapt import train

        items = adata_list if isinstance(adata_list, list) else [adata_list]
        if isinstance(species, list):
            if len(set(species) - {None}) > 1:
                raise TrainError(
                    "train(species=[...])",
                    "names several species: runs here read one species per input, found by gene overlap.",
                    "Leave species=None (inferred per input) or give one species for all.",
                )
            species = next((s for s in species if s is not None), None)
        gene_mappings = None
        if self.loaded is None:
            paths = getattr(self.cfg, "PATH", None) if self.cfg is not None else None
            gene_mappings = getattr(paths, "GENE_MAPPINGS_PATH", None) if paths is not None else None
        self.loaded = train(
            items,
            self.work_dir,
            model=self.loaded,
            steps=int(max_steps or 200),
            species=species,
            gene_mappings=gene_mappings,
            batch_size=int(batch_size or 32),
        )
        self.cfg = self.loaded.cfg
        return self


def load_config_and_model(model_name: str | None = None, cache_dir: str = "./cache/", **files) -> scConcept:
    """`scConcept(cache_dir=...).load_config_and_model(model_name, **files)` in one call."""
    return scConcept(cache_dir=cache_dir).load_config_and_model(model_name, **files)
