"""The config keys of the data module (`datamodule.*`): their types, ranges and defaults, here only.

A validation loader (`dataset.val.<loader>`, `dataloader.val.<loader>`) takes the keys of the
training loader where the reference's validation loaders inherit them: `max_tokens` from
`dataset.train`, and `within_group_sampling`, `batch_size`, `shuffle`, `drop_last` from
`dataloader.train` (a null here means "as for training"). Its panel keys do not inherit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .fields import key

NORMALIZATIONS = ("raw", "log1p", "totalcount", "totalcount/log1p")  # and binning/N
NORMALIZATIONS_DOC = "raw | log1p | totalcount | totalcount/log1p | binning/N"
GENE_SAMPLING_STRATEGIES = ("top-nonzero", "random-nonzero", "top", "random")
BATCHINGS = ("per_dataset", "mixed")
PANEL_SELECTIONS = ("random", "preselected", "mixed")
PANEL_VIEW2 = ("random", "complement")


def _normalization(value) -> str | None:
    if value in NORMALIZATIONS:
        return None
    m = re.fullmatch(r"binning/(\d+)", str(value))
    return None if m and int(m.group(1)) >= 2 else f"must be one of {NORMALIZATIONS_DOC} (N >= 2)"


def _regex(value) -> str | None:
    try:
        re.compile(str(value))
    except re.error as exc:
        return f"is not a Python regular expression ({exc})"
    return None


def _overlap(value) -> str | None:
    if isinstance(value, bool) or (isinstance(value, (int, float)) and 0 <= value <= 1):
        return None
    return "must be true, false or a probability in [0, 1]"


def _panel_size(value) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return None
    return "must be a fraction in (0, 1) of the file's genes or a gene count >= 1"


def _group_keys(value) -> str | None:
    if (
        value is None
        or isinstance(value, str)
        or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    ):
        return None
    return "must be null, an obs key (`dataset` = the input file) or a list of obs keys"


def _cache_limit(value) -> str | None:
    if (
        value is None
        or isinstance(value, int)
        and value > 0
        or re.fullmatch(r"\d+(\.\d+)?\s*[kmgtp]?i?b?", str(value).lower())
    ):
        return None
    return "must be a size such as 10gb, a byte count, or null"


def _check_sources(value) -> str | None:
    return None if type(value) is bool or value == "full" else "must be true, full or false"


@dataclass
class PanelKeys:
    """The view keys shared by the training loader and each validation loader."""

    split: List[Any] = key([], "the loader's files: split items")
    batching: str = key("per_dataset", "per_dataset | mixed", choices=BATCHINGS)
    epoch_size: Optional[int] = key(None, "cells per epoch when the sources carry `proportion`", gt=0)
    panel_selection: str = key("mixed", "random | preselected | mixed", choices=PANEL_SELECTIONS)
    panel_selection_mixed_prob: float = key(0.25, "with mixed: probability that view 1 is random", ge=0, le=1)
    panel_filter_regex: str = key(".*", "designed panels whose file stem matches", check=_regex)
    panel_size_min: Any = key(0.02, "lower bound of random panel sizes", check=_panel_size)
    panel_size_max: Any = key(60000, "upper bound of random panel sizes", check=_panel_size)
    panel_max_drop_rate: float = key(0.5, "designed-panel genes dropped with prob r ~ U(0, this)", ge=0, le=1)
    panel_overlap: Any = key(False, "whether view 2 may overlap view 1", check=_overlap)
    panel_view2: str = key("random", "random | complement", choices=PANEL_VIEW2)
    panel_curriculum: Optional[List[Any]] = key(None, "panel keys that change during training")
    variable_size: bool = key(
        False,
        refuse_unless=False,
        doc="scConcept's variable-size views are not built here; views are cut at max_tokens.",
    )


@dataclass
class TrainDatasetKeys(PanelKeys):
    max_tokens: int = key(1000, "genes per view (plus <cls>)", ge=1)
    # the reference's training-only view filters (masked items leave the loss and the metrics)
    feature_max_drop_rate: Optional[float] = key(
        None, "per batch r ~ U(0, this): candidate genes dropped with prob r", ge=0, le=1
    )
    qc_threshold: Optional[float] = key(None, "mask an item whose view is <= panel size x this", ge=0)
    max_total_seq_length: Optional[int] = key(None, "token budget of a batch; items past it are masked", gt=0)


@dataclass
class ValDatasetKeys(PanelKeys):
    max_tokens: Optional[int] = key(None, "genes per view; null = dataset.train.max_tokens", ge=1)


@dataclass
class DatasetKeys:
    train: TrainDatasetKeys = key(TrainDatasetKeys())
    val: Dict[str, ValDatasetKeys] = key({}, "validation loaders by name")


@dataclass
class TrainLoaderKeys:
    batch_size: int = key(128, "the GLOBAL batch in cells", ge=1)
    shuffle: bool = key(True, "shuffle batches and rows each epoch")
    num_workers: int = key(2, "DataLoader worker processes per rank", ge=0)
    drop_last: bool = key(True, "drop each group's last incomplete batch")
    within_group_sampling: Any = key(
        "dataset", "obs key(s) a batch shares; dataset = the input file", check=_group_keys
    )
    num_groups: Optional[int] = key(None, "keep this many random groups", ge=1)
    sample_groups_equally: bool = key(False, "cut every group to the same size")
    num_samples: Optional[int] = key(None, "cells per epoch (groups cut to it)", ge=1)
    pin_memory: bool = key(False, inert="batches are handed to the device by the trainer")


@dataclass
class ValLoaderKeys:
    batch_size: Optional[int] = key(None, "null = dataloader.train.batch_size", ge=1)
    shuffle: Optional[bool] = key(None, "null = dataloader.train.shuffle")
    num_workers: int = key(0, "DataLoader worker processes per rank", ge=0)
    drop_last: Optional[bool] = key(None, "null = dataloader.train.drop_last")
    within_group_sampling: Any = key("train", "as for training; `train` = dataloader.train's", check=_group_keys)
    num_groups: Optional[int] = key(None, "keep this many random groups", ge=1)
    sample_groups_equally: bool = key(False, "cut every group to the same size")
    num_samples: Optional[int] = key(None, "cells per validation pass", ge=1)
    pin_memory: bool = key(False, inert="batches are handed to the device by the trainer")
    max_samples_per_group: Optional[int] = key(
        None, inert="scConcept's cap of cells per group (February 2026); use num_groups / num_samples here"
    )


@dataclass
class DataloaderKeys:
    train: TrainLoaderKeys = key(TrainLoaderKeys())
    val: Dict[str, ValLoaderKeys] = key({}, "validation loaders by name")


@dataclass
class DataModuleKeys:
    name: str = key("DataModule", inert="the reference's data module class; there is one here")
    species: List[str] = key(["hsapiens"], "the species a run knows")
    obs_keys: List[str] = key(["dataset", "donor_id", "tissue", "cell_type"], "obs columns kept; kNN labels")
    normalization: str = key("raw", NORMALIZATIONS_DOC, check=_normalization)
    gene_sampling_strategy: str = key(
        "top-nonzero", "which genes of a view become tokens", choices=GENE_SAMPLING_STRATEGIES
    )
    val_seed: int = key(0, "seed of the validation loaders' cells and panels")
    cache_limit: Any = key(
        None, "bound on the cache that remote shards, and with it local ones, are read through", check=_cache_limit
    )
    check_sources: Any = key(
        True,
        "true: a source is current when its size and mtime are the recorded ones; "
        "full: read every source's fingerprint; false: no source check",
        check=_check_sources,
    )
    dataset: DatasetKeys = key(DatasetKeys())
    dataloader: DataloaderKeys = key(DataloaderKeys())
    # filled when the config is typed, from the split files mounted at `split_<source>_<species>`
    # (never set directly: concept_shard.config refuses it)
    mounted_splits: Dict[str, Any] = key({}, "the split files by key, resolved")
    # scConcept's keys with no effect here
    columns: Optional[List[str]] = key(None, inert="the obs columns are datamodule.obs_keys")
    label_keys_to_monitor: Optional[List[str]] = key(
        None, inert="kNN accuracy is reported for every datamodule.obs_keys"
    )
    batch_keys_to_monitor: Optional[List[str]] = key(
        None, inert="kNN accuracy is reported for every datamodule.obs_keys"
    )
    model_speed_sanity_check: bool = key(False, inert="a Lightning debugging switch")
    precomp_embs_key: Optional[str] = key(
        None, refuse_unless=None, doc="precomputed embeddings as model input are not built here."
    )
