"""`train(inputs, work_dir, ...)`: light adaptation (or a small run from scratch) from Python.

The inputs (AnnData objects or .h5ad/.zarr paths) become a project in `work_dir`: a split per
input and species, written to `work_dir/conf/` as an ordinary datamodule (`ApiModule`), sharded
by `concept-shard`'s own code and trained by `concept-train`'s own loop. So the run directory,
its checkpoints and metrics are the same as on the command line, and the printed commands
repeat or resume the run there:

    concept-shard build WORK_DIR --config-dir WORK_DIR/conf datamodule=ApiModule model=ApiModel
    concept-train WORK_DIR --config-dir WORK_DIR/conf datamodule=ApiModule model=ApiModel ...

Fine-tuning (`model=` a loaded model or a run) keeps the model's architecture, vocabularies,
species, panels and data settings, and loads its weights into a new run
(`initialize.checkpoint`, `create_new_run`). From scratch, `gene_mappings` names the token
mapping CSVs and `model_config` a model config of `conf/model/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import anndata
import yaml

from concept_config import Root
from concept_config.fields import whole
from concept_shard.config import as_dict, compose_config
from concept_shard.errors import TrainError
from concept_shard.source import AnnDataObjectSource, AnnDataSource
from concept_shard.vocabulary import load_vocabulary, mapping_file

from .embedding import infer_species
from .trainer.checkpoint import LoadedModel, load_model

API_MODULE = "ApiModule"
API_MODEL = "ApiModel"
OBJECTS_SOURCE = "api-objects"  # AnnData objects are written under data/<this>/h5ads/


def _source_name(directory: Path) -> str:
    """A stable source name per input directory: same inputs, same shard datasets (resumable)."""
    return "api-" + hashlib.blake2b(str(directory.resolve()).encode(), digest_size=4).hexdigest()


def _as_files(inputs, work_dir: Path, gene_id_column: str | None, log) -> list[tuple[Path, object]]:
    """(path, gene-id reader) per input; AnnData objects are written to work_dir first."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "obs"):
        inputs = [inputs]
    out = []
    objects_dir = work_dir / "data" / OBJECTS_SOURCE / "h5ads"
    for i, item in enumerate(inputs):
        if hasattr(item, "obs") and hasattr(item, "X"):
            objects_dir.mkdir(parents=True, exist_ok=True)
            path = objects_dir / f"adata_{i}.h5ad"
            AnnDataObjectSource(item, gene_id_column)  # checks the gene id column up front
            # an object read from a file of anndata >= 0.13 holds pandas string arrays, which anndata
            # 0.12 (Python 3.11's) writes only when asked to
            with anndata.settings.override(allow_write_nullable_strings=True):
                item.write_h5ad(path)
            out.append(path)
            log(f"[train] input {i}: AnnData object {item.n_obs} x {item.n_vars} written to {path}")
            continue
        path = Path(item)
        if not path.exists():
            raise TrainError(path, "does not exist.", "Pass AnnData objects or paths of .h5ad files / .zarr stores.")
        if not (path.suffix in (".h5ad", ".zarr") or path.is_dir()):
            raise TrainError(path, "is not an .h5ad file or an AnnData .zarr store.", "Convert it with anndata first.")
        out.append(path.resolve())
    if not out:
        raise TrainError("train(inputs=...)", "is empty.", "Pass at least one AnnData object or file.")
    return out


def _species_of(path: Path, vocabs: dict, gene_id_column: str | None, species: str | None) -> str:
    if species is not None:
        return species
    with AnnDataSource(path, gene_id_column, listed_in="train(inputs)") as src:
        return infer_species(src.gene_ids(), vocabs, path)


def _copy_references(work_dir: Path, mappings: Path, species: list[str], panels: Path | None) -> None:
    """Vocabularies (and the base run's panels) into the work dir: a self-contained project that
    `concept-shard` and `concept-train` use with their default paths."""
    import shutil

    vocab_dir = work_dir / "references" / "vocabulary" / "token_mappings_per_specie"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    for sp in species:
        src, dst = mapping_file(mappings, sp), vocab_dir / f"{sp}.csv"
        if src.resolve() != dst.resolve() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            shutil.copyfile(src, dst)
    if panels is not None and panels.is_dir() and panels.resolve() != (work_dir / "panels").resolve():
        shutil.copytree(panels, work_dir / "panels", dirs_exist_ok=True)


def _write_configs(conf_dir: Path, datamodule: dict, model: dict | None) -> None:
    (conf_dir / "datamodule").mkdir(parents=True, exist_ok=True)
    header = "# Written by concept_train.train(); edit and rerun with concept-shard / concept-train.\n"
    (conf_dir / "datamodule" / f"{API_MODULE}.yaml").write_text(header + yaml.safe_dump(datamodule, sort_keys=False))
    if model is not None:
        (conf_dir / "model").mkdir(parents=True, exist_ok=True)
        (conf_dir / "model" / f"{API_MODEL}.yaml").write_text(header + yaml.safe_dump(model, sort_keys=False))


def train(
    inputs,
    work_dir,
    model=None,
    steps: int = 200,
    *,
    species: str | None = None,
    gene_id_column: str | None = None,
    gene_mappings=None,
    model_config: str = "ContrastiveModelTiny",
    batch_size: int = 32,
    max_tokens: int | None = None,
    lr: float | None = None,
    run_id: str | None = None,
    overrides=(),
    num_workers: int = 0,
    progress: bool = True,
    log=print,
) -> LoadedModel:
    """Shard `inputs` into `work_dir` and train for `steps` optimizer steps; return the trained model.

    inputs:         AnnData objects and/or .h5ad / .zarr paths (raw counts in `.raw` or `X`).
    model:          a `load_model()` result or a run / checkpoint directory to fine-tune from;
                    None trains `model_config` from scratch (then `gene_mappings` is required).
    species:        for every input; by default inferred per input from gene-id overlap.
    overrides:      any further `key=value` config overrides, applied last.
    Returns the loaded last checkpoint of the new run (its `.checkpoint.parent.parent` is the run).
    """
    from .trainer.loop import run_training

    _check_arguments(inputs, work_dir, steps, batch_size, max_tokens, lr, num_workers)
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    base = model if isinstance(model, LoadedModel) or model is None else load_model(model, "cpu")
    mappings, vocabs = _vocabularies(base, gene_mappings)
    splits = _splits(_as_files(inputs, work_dir, gene_id_column, log), work_dir, vocabs, gene_id_column, species)
    # the data module: the base run's (fine-tuning) or the packaged default's settings, our splits
    dm = _datamodule(
        base.cfg if base is not None else compose_config(work_dir),
        splits,
        fine_tune=base is not None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        num_workers=num_workers,
    )
    _copy_references(work_dir, mappings, dm["species"], Path(base.cfg.PATH.PANELS_PATH) if base is not None else None)
    _write_configs(work_dir / "conf", dm, as_dict(base.cfg)["model"] if base is not None else None)
    start = _checkpoint_of(base, work_dir) if base is not None else None
    args = _run_overrides(base, steps, model_config, lr, run_id, start) + list(overrides)
    cfg = compose_config(work_dir, args, work_dir / "conf")
    _shard(cfg, progress, log)
    result = run_training(cfg, log=log)
    keep = [
        a
        for a in args
        if a.startswith(("datamodule=", "model=", "model.", "PATH."))
        and not a.startswith(("model.training.max_steps", "model.training.checkpoint_every"))
    ]
    if result["stopped"] is not None:
        log(f"[train] stopped by {result['stopped']} after step {result['step']}, before steps={steps}")
    log(
        f"[train] run {result['run_id']}: {result['run_dir']} (checkpoint {result['checkpoint']})\n"
        f"[train] to continue it: concept-train {work_dir} --config-dir {work_dir / 'conf'} {' '.join(keep)} "
        f"initialize.resume=True initialize.run_id={result['run_id']} model.training.max_steps=<N>"
    )
    return load_model(result["checkpoint"])


def _check_arguments(inputs, work_dir, steps, batch_size, max_tokens, lr, num_workers) -> None:
    """train()'s arguments, each named with what it takes, before any work (`steps=-3` was
    reported as a bad `warmup`)."""
    wrong = None
    if inputs is None or isinstance(inputs, (int, float, bool)):
        wrong = ("inputs", inputs, "AnnData objects and/or .h5ad / .zarr paths (one, or a list)")
    elif not isinstance(work_dir, (str, os.PathLike)):
        wrong = ("work_dir", work_dir, "a directory path (str or Path)")
    elif not whole(steps, 1):
        wrong = ("steps", steps, "a whole number of optimizer steps, at least 1")
    elif not whole(batch_size, 1):
        wrong = ("batch_size", batch_size, "a whole number of cells, at least 1")
    elif max_tokens is not None and not whole(max_tokens, 1):
        wrong = ("max_tokens", max_tokens, "a whole number of genes per cell, at least 1 (or None)")
    elif lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < float("inf")):
        wrong = ("lr", lr, "a finite learning rate of 0 or more (or None)")
    elif not whole(num_workers, 0):
        wrong = ("num_workers", num_workers, "a whole number of DataLoader workers, at least 0")
    if wrong is not None:
        name, value, takes = wrong
        raise TrainError(f"train({name}=...)", f"is {value!r}.", f"It takes {takes}.")


def _vocabularies(base: LoadedModel | None, gene_mappings) -> tuple[Path, dict]:
    """(token mapping directory, species -> vocabulary): the base model's, else `gene_mappings`'."""
    if base is not None:
        return Path(base.cfg.PATH.GENE_MAPPINGS_PATH), base.vocabs
    if gene_mappings is None:
        raise TrainError(
            "train(gene_mappings=...)",
            "is needed to train from scratch.",
            "Pass the directory of <species>.csv token mappings, or model= to fine-tune.",
        )
    mappings = Path(gene_mappings).resolve()
    found = sorted(p.stem for p in mappings.glob("*.csv")) if mappings.is_dir() else []
    if not found:
        raise TrainError(
            mappings, "holds no <species>.csv token mapping.", "Point gene_mappings at the vocabulary directory."
        )
    return mappings, {sp: load_vocabulary(mappings, sp) for sp in found}


def _splits(
    files: list[Path], work_dir: Path, vocabs: dict, gene_id_column: str | None, species: str | None
) -> dict[str, dict]:
    """A split per input directory and species: datamodule key -> split dict."""
    splits: dict[str, dict] = {}
    for path in files:
        sp = _species_of(path, vocabs, gene_id_column, species)
        if sp not in vocabs:
            raise TrainError(
                path, f"was given species '{sp}', which has no vocabulary here.", f"Use one of {sorted(vocabs)}."
            )
        name = (
            OBJECTS_SOURCE
            if path.parent.parent.name == OBJECTS_SOURCE and path.is_relative_to(work_dir)
            else _source_name(path.parent)
        )
        key = f"split_{name.replace('-', '_')}_{sp}"
        split = splits.setdefault(
            key,
            {
                "source_name": name,
                "species": sp,
                "source_path": str(path.parent),
                "var_gene_id_column": gene_id_column,
                "train": [],
            },
        )
        split["train"].append(path.name)
    return splits


def _datamodule(
    root: Root, splits: dict[str, dict], fine_tune: bool, batch_size: int, max_tokens: int | None, num_workers: int
) -> dict:
    """The `ApiModule` data module: `root`'s settings (the base run's, or the defaults) without its
    splits and validation loaders, reading `splits` (the base run's species when fine-tuning)."""
    dm = {k: v for k, v in as_dict(root)["datamodule"].items() if not k.startswith("split_")}
    if not fine_tune:
        dm["species"] = sorted({s["species"] for s in splits.values()})
    dm.update(splits)
    dm["dataset"] = {"train": {**dm["dataset"]["train"], "split": [f"${{datamodule.{k}}}" for k in splits]}}
    if max_tokens is not None:
        dm["dataset"]["train"]["max_tokens"] = int(max_tokens)
    dm["dataloader"] = {
        "train": {**dm["dataloader"]["train"], "batch_size": int(batch_size), "num_workers": int(num_workers)}
    }
    return dm


def _run_overrides(
    base: LoadedModel | None,
    steps: int,
    model_config: str,
    lr: float | None,
    run_id: str | None,
    start: Path | None = None,
) -> list[str]:
    """The run's overrides: our data module and model, `steps` steps with one checkpoint at the
    end, no validation; a fine-tuned model's weights into a new run."""
    args = [
        f"datamodule={API_MODULE}",
        f"model={API_MODEL if base is not None else model_config}",
        f"model.training.max_steps={int(steps)}",
        "model.training.val_check_interval=0",
        "model.training.validate_before_training=False",
        f"model.training.checkpoint_every_n_steps={int(steps)}",
        f"model.training.warmup={min(int(steps) // 10, 100)}",
    ]
    if base is not None:
        args += [f"initialize.checkpoint={start}", "initialize.create_new_run=True"]
        if base.cfg.PATH.PRETRAINED_VOCABULARY:  # its layout has the pretrained-vector adapter
            args.append(f"PATH.PRETRAINED_VOCABULARY={base.cfg.PATH.PRETRAINED_VOCABULARY}")
    if lr is not None:
        args.append(f"model.training.lr={lr}")
    if run_id is not None:
        args.append(f"initialize.run_id={run_id}")
    return args


def _checkpoint_of(base: LoadedModel, work_dir: Path) -> Path:
    """What `initialize.checkpoint` names for the base model: its checkpoint, or for one of
    scConcept's models its model directory (the trainer reads the directory: config, mappings,
    weights). A scConcept model loaded from files named one by one is first written out as one
    (`concept-export`: its tensors bit for bit) into `work_dir/base_model`."""
    ckpt = Path(base.checkpoint)
    if not base.model.cfg.scconcept_layout:
        return ckpt
    from .scconcept import export, model_dir

    home, mappings = ckpt.parent, Path(base.cfg.PATH.GENE_MAPPINGS_PATH)
    if ckpt.name == model_dir.CKPT and model_dir.is_model_dir(home) and mappings == home / model_dir.MAPPINGS:
        return home
    out = work_dir / "base_model"
    shutil.rmtree(out, ignore_errors=True)
    return export.export(base, out, log=lambda *a: None)


def _shard(cfg: Root, progress: bool, log) -> None:
    """Shard the run's files with concept-shard's own code (in this process)."""
    from concept_shard.build import ShardJob

    report = ShardJob(cfg.PATH, cfg.shard, cfg.datamodule, progress=progress, log=log).run_task(0, 1)
    if report.failed:
        raise report.failed[0]
    log(f"[train] sharded {len(report.datasets)} dataset(s) into {cfg.PATH.SHARDS_PATH}")
