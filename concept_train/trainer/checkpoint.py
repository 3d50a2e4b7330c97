"""Checkpoints (docs/design.md, "Runs and checkpoints"): `checkpoints/step_<N>/`, `latest` moved last;
and the one way to find and load one (`resolve_checkpoint`, `load_model`), used by the trainer,
the embedder and the Python API.

A checkpoint is written into `step_<N>.tmp/` (model and optimizer through
torch.distributed.checkpoint, sharded across ranks; `trainer_state.json` with step, scheduler and
loader state; `rng.pt` with every rank's RNG state), renamed to `step_<N>/` once complete, and only
then does the `latest` file (written atomically) point at it. A run killed at any moment leaves
either the previous checkpoint as latest, or the new one complete. Older checkpoints beyond
`keep_last` are deleted after `latest` moves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from concept_config import Root
from concept_config.fields import whole
from concept_shard.config import as_dict, typed_config
from concept_shard.errors import StorageError, TrainError
from concept_shard.fingerprint import content_hash
from concept_shard.vocabulary import Vocabulary, load_vocabulary
from concept_shard.yaml_bounds import yaml_problem

from ..model import ContrastiveModel, ModelConfig
from ..model.model import LEGACY_KEYS, OPTIONAL_PREFIXES
from .distributed import Dist


def _gather_objects(obj, d: Dist) -> list:
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def checkpoint_step(path: Path) -> int:
    """`.../checkpoints/step_<N>` -> N."""
    return int(Path(path).name.split("_")[1])


def latest_checkpoint(run_dir: Path, pointer_name: str = "latest") -> Path | None:
    """The checkpoint `checkpoints/latest` (or `checkpoints/best`, model.training.keep_best) names,
    if it is complete. The pointer holds one name of the form step_<N>; anything else (a path that
    would lead out of the run) is not a checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / pointer_name
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not re.fullmatch(r"step_\d+", name):
        return None
    path = pointer.parent / name
    return path if (path / "trainer_state.json").is_file() else None


def damage(checkpoint: Path, only: tuple[str, ...] | None = None) -> str | None:
    """None when every file of the checkpoint (or those in `only`) matches `checksums.json`; else
    the first file that is missing or differs. Checkpoints written before checksums were recorded
    cannot be checked."""
    listed = Path(checkpoint) / CHECKSUMS
    if not listed.is_file():
        return None
    try:
        expected = json.loads(listed.read_text())
    except ValueError:
        return CHECKSUMS
    for name, digest in sorted(expected.items()):
        if only is not None and name not in only:
            continue
        file = Path(checkpoint) / name
        if not file.is_file() or content_hash(file) != digest:
            return name
    return None


def load_config_yaml(path: Path):
    """A checkpoint's or run's config.yaml as OmegaConf reads it, once its size, nesting and node
    count (aliases expanded) are within bounds (yaml_bounds.py: a run's config.yaml is a few KB
    with a few hundred leaves); a TrainError naming the file otherwise."""
    problem = yaml_problem(path, "a run's config")
    if problem is not None:
        raise TrainError(path, problem, "Use another checkpoint of the run, or restore the run's config.yaml.")
    return OmegaConf.load(path)


def intact_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint of the run whose files match their checksums: the one
    `latest` names, else (with a warning naming each damaged one) the next older one."""
    root = Path(run_dir) / "checkpoints"
    first = latest_checkpoint(run_dir)
    others = sorted(
        (
            p
            for p in root.glob("step_*")
            if re.fullmatch(r"step_\d+", p.name) and (p / "trainer_state.json").is_file() and p != first
        ),
        key=checkpoint_step,
        reverse=True,
    )
    for ckpt in ([first] if first is not None else []) + others:
        bad = damage(ckpt)
        if bad is None:
            return ckpt
        log(
            f"[train] WARNING: checkpoint {ckpt} is damaged ({bad} does not match its checksum); "
            "trying the previous one."
        )
    return None


POINTERS = ("latest", "best")  # files in checkpoints/ that name one of its step_<N>


def resolve_checkpoint(path) -> Path | None:
    """A run directory (its latest complete checkpoint), a `checkpoints/step_<N>` directory, or a
    pointer of `checkpoints/` by name (`.../checkpoints/best`, `.../checkpoints/latest`)."""
    path = Path(path)
    if path.name in POINTERS and path.is_file():
        return latest_checkpoint(path.parent.parent, path.name)
    return latest_checkpoint(path) or (path if (path / "trainer_state.json").is_file() else None)


def mark_best(checkpoint: Path) -> None:
    """Point `checkpoints/best` at `checkpoint` (written whole, then renamed into place)."""
    pointer = Path(checkpoint).parent / "best"
    tmp = pointer.with_name("best.tmp")
    tmp.write_text(Path(checkpoint).name + "\n")
    os.replace(tmp, pointer)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    d: Dist,
    keep_last: int,
    run_config: Root | None = None,
    resumed_from: Path | None = None,
    keep_also: str | None = None,
) -> Path:
    """Write checkpoint step_<step> and point `latest` at it; older ones beyond `keep_last` go,
    except `keep_also` (the best one's name, model.training.keep_best)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if resumed_from is not None and Path(resumed_from) == final:
        # a resumed run that had already reached its last step: the state is the one saved there.
        # Replacing it would leave `latest` naming nothing for a moment, and a kill then loses the run.
        return final
    try:
        return _save(root, final, tmp, step, model, optimizer, trainer_state, d, keep_last, run_config, keep_also)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not _storage_failure(exc):
            raise
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        raise StorageError(
            final,
            f"could not be written ({_last_error(exc)}); "
            f"{free / 1e9:.2f} GB are free there. Nothing of it was kept; the previous checkpoints are intact.",
            "Free space (or raise the quota) under PATH.CHECKPOINT_ROOT, then resume the run "
            "(initialize.resume=True): it continues from its last complete checkpoint.",
        ) from None


def _last_error(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of an error's text (DCP's CheckpointException
    carries each rank's traceback as text), else its type and first 300 characters."""
    lines = re.findall(r"^(\w+(?:Error|Exception): .*)$", str(exc), re.MULTILINE)
    return lines[-1][:300] if lines else f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _storage_failure(exc: BaseException) -> bool:
    """Whether a failure to write a checkpoint came from the storage (no space, a quota, a file
    size limit, an I/O error): an OSError anywhere in its chain, or torch's writers' own words for
    one ("file write failed", "PytorchStreamWriter failed writing", ...)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) or re.search(r"writ|no space|quota|disk", str(exc), re.IGNORECASE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _save(root, final, tmp, step, model, optimizer, trainer_state, d, keep_last, run_config, keep_also) -> Path:
    """save_checkpoint's writing: every file into `tmp`, then `tmp` renamed into place and
    `latest` pointed at it."""
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = _gather_objects(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, d
    )
    if d.is_main:
        torch.save(rng, tmp / "rng.pt")
        _write_shareable(tmp, weights, model.cfg, run_config)
        # every file but the two small JSONs, so that a resume or a load can tell a damaged checkpoint
        checksums = {p.name: content_hash(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != CHECKSUMS}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1) + "\n")
        with open(tmp / "trainer_state.json", "w") as fh:
            json.dump(dict(trainer_state, step=step, world_size=d.world_size), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)  # not `latest` (above): a leftover of a killed attempt
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / "latest")
        done = sorted(
            (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), key=checkpoint_step
        )
        for old in done[:-keep_last] if keep_last > 0 else []:
            if old.name != keep_also:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    d.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, d: Dist, weights_only: bool = False, rng: bool = True) -> dict:
    """Load `path` into model (and optimizer, and RNG unless `rng` is False, unless weights_only);
    returns trainer_state.

    weights_only reads the shareable `model.safetensors` (no pickle: a checkpoint from elsewhere
    runs no code); a resume reads DCP's files, whose metadata is a pickle: a run directory is
    trusted like any pickle (README, "Security")."""
    path = Path(path)
    if weights_only:
        # a new run: a decoder head (a training head) may come or go; the residual tables may be new
        mine = set(model.state_dict())
        weights = {
            k: v
            for k, v in read_weights(path).items()
            if k not in LEGACY_KEYS and (k in mine or not k.startswith("decoder."))
        }
        missing, unexpected = set_model_state_dict(
            model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        missing = [k for k in missing if not k.startswith(OPTIONAL_PREFIXES + ("decoder.",))]
        if missing or unexpected:
            raise TrainError(
                path,
                f"holds weights that do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}).",
                "Start from a checkpoint of the same architecture.",
            )
        return json.loads((path / "trainer_state.json").read_text())
    msd, osd = get_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # The old MLM parameters got optimizer state only in runs that trained MLM; other runs of a
    # value-encoding model resume (the parameters are simply not loaded)
    if any(key.startswith(f"optim.state.{k}.") for k in LEGACY_KEYS for key in saved):
        raise TrainError(
            path,
            "was written by a version whose MLM head (a learnable mask vector) differs from "
            "today's (values replaced by model.mask_value, a decoder head): its optimizer state does "
            "not fit.",
            f"Start a new run from its weights: initialize.checkpoint={path} initialize.create_new_run=True.",
        )
    # The learnable residual tables of a model with pretrained vectors are younger than some
    # checkpoints: those keep their zeros (what a checkpoint without them means).
    msd = {k: v for k, v in msd.items() if f"model.{k}" in saved or not k.startswith(OPTIONAL_PREFIXES)}
    # A parameter that had no gradient before the checkpoint (the gene table of a species not yet
    # seen) has no optimizer state in it, while a fresh optimizer's state dict has state for every
    # parameter. Load only what was saved: the parameter then starts without state, as it would
    # have in the uninterrupted run.
    osd = dict(
        osd, state={fqn: s for fqn, s in osd["state"].items() if all(f"optim.state.{fqn}.{k}" in saved for k in s)}
    )
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    if not rng:
        return json.loads((path / "trainer_state.json").read_text())
    try:
        rng = torch.load(path / "rng.pt", weights_only=True)  # tensors and dicts only: no code runs
    except Exception as exc:  # a file that holds anything else (code included) is refused
        raise TrainError(
            path / "rng.pt",
            f"is not the RNG state concept-train writes ({type(exc).__name__}).",
            "The checkpoint is damaged or was altered: resume from an earlier checkpoint of the run, "
            "or start a new run.",
        ) from None
    mine = rng[d.rank] if d.rank < len(rng) else rng[0]
    torch.set_rng_state(mine["cpu"])
    if mine.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


# ---- resuming with another config ------------------------------------------------------------
# Keys that decide the parameters' shapes or what they compute: a resume that changes one would
# load weights into another model (or fail deep inside DCP). The batch sequence is the loader's
# to guard (its state refuses another plan by name).
ARCHITECTURE_KEYS = (
    "model.dim_model",
    "model.nlayers",
    "model.num_head",
    "model.dim_hid",
    "model.dim_gene_embs",
    "model.dim_pretrained_vocab",
    "model.projection_dim",
    "model.norm_scheme",
    "model.activation",
    "model.input_encoding",
    "model.pe_max_len",
    "model.layout",
    "model.cls_value",
    "datamodule.species",
)
# Keys that say where things are, or how this run is started: they differ on every resume.
RESUME_KEYS = ("initialize.",)


def _flat(cfg, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(checkpoint: Path, cfg: Root, fresh: bool = False) -> list[str]:
    """The keys whose values differ from the config the checkpoint was written with, as
    "key (old -> new)"; a TrainError naming the first architecture key that differs (`fresh`:
    for initialize.fresh_training, which also needs the same model). The checkpoint's config is
    read in the current schema: keys a later version added hold their defaults there."""
    checkpoint = Path(checkpoint)
    saved = checkpoint / CONFIG if (checkpoint / CONFIG).is_file() else checkpoint.parent.parent / CONFIG
    if not saved.is_file():
        return []
    old = _flat(as_dict(typed_config(load_config_yaml(saved))))
    new = _flat(as_dict(cfg))
    old["PATH.PRETRAINED_VOCABULARY"] = bool(old["PATH.PRETRAINED_VOCABULARY"])  # only its presence
    new["PATH.PRETRAINED_VOCABULARY"] = bool(new["PATH.PRETRAINED_VOCABULARY"])  # shapes the tables
    for key in ARCHITECTURE_KEYS + ("PATH.PRETRAINED_VOCABULARY",):
        if key == "model.dim_pretrained_vocab" and not new["PATH.PRETRAINED_VOCABULARY"]:
            continue  # no pretrained tables: the width is unused
        if key == "model.cls_value" and new["model.input_encoding"] != "value_encoding":
            continue  # <cls> carries no value into a rank encoding
        if old[key] != new[key]:
            raise TrainError(
                key,
                f"is {new[key]!r}, but checkpoint {checkpoint} was written with "
                f"{old[key]!r}: "
                + (
                    "fresh_training loads its optimizer state, which needs the same model."
                    if fresh
                    else "a resume continues the same model."
                ),
                f"Set {key}={old[key]!r}"
                + (
                    ", or drop initialize.fresh_training to take only the weights that fit"
                    if fresh
                    else ", or start a new run from its weights (initialize."
                    f"checkpoint={checkpoint} initialize.create_new_run="
                    "True) if only non-shape keys differ"
                )
                + ".",
            )
    # split files and validation loaders may come or go: a key on one side only is None on the other
    return [
        f"{k} ({old.get(k)!r} -> {new.get(k)!r})"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and not k.startswith(RESUME_KEYS)
    ]


def check_layout(checkpoint: Path, model_cfg: ModelConfig) -> None:
    """A TrainError when the checkpoint's model has parameters this model lacks or the other way
    round beyond what `load_checkpoint` bridges: today the decoder head (`model.decoder_head`, or
    the MLM loss on: `masking_rate` > 0 and `mlm_loss_weight` > 0), which no config key alone shows."""
    path = Path(checkpoint) / MODEL_JSON
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("decoder_head", False)
    if bool(old) != bool(model_cfg.decoder_head):
        have = "has" if old else "has no"
        raise TrainError(
            "model.decoder_head",
            f"makes a model {'with' if model_cfg.decoder_head else 'without'} a "
            f"decoder head, but checkpoint {checkpoint} {have} one (the MLM loss needs it: "
            "model.training.masking_rate > 0 with model.mlm_loss_weight > 0).",
            f"Set model.decoder_head={bool(old)} (and the MLM keys as the checkpoint's run had them), or "
            f"start a new run from its weights (initialize.checkpoint={checkpoint} "
            "initialize.create_new_run=True).",
        )


# ---- the shareable part of a checkpoint: weights and configs, no pickle ----------------------
WEIGHTS, MODEL_JSON, CONFIG, CHECKSUMS = "model.safetensors", "model.json", "config.yaml", "checksums.json"
VOCABULARIES = "vocabularies.json"  # species -> the token mapping's fingerprint the weights were trained with


def write_config(cfg: Root, path: Path) -> None:
    """The typed config as the YAML tree, every value resolved: a run's (or a checkpoint's) config.yaml."""
    OmegaConf.save(OmegaConf.create(as_dict(cfg)), path)


def _write_shareable(directory: Path, weights: dict, model_cfg: ModelConfig, run_config: Root | None) -> None:
    """`model.safetensors` (the full weights), `model.json` (the architecture) and `config.yaml`
    (this run segment's resolved config): everything `load_model` needs, in formats that carry
    data only."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(directory / WEIGHTS),
        metadata={"format": "pt", "written_by": "concept-train"},
    )
    (directory / MODEL_JSON).write_text(json.dumps(asdict(model_cfg), indent=1, sort_keys=True) + "\n")
    if run_config is not None:
        write_config(run_config, directory / CONFIG)
        mappings = Path(run_config.PATH.GENE_MAPPINGS_PATH)
        prints = {sp: load_vocabulary(mappings, sp).fingerprint for sp in run_config.datamodule.species}
        (directory / VOCABULARIES).write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")


def _check_vocabularies(ckpt: Path, vocabs: dict[str, Vocabulary], mappings) -> None:
    """Each species' token mapping is the one the weights were trained with (checkpoints written
    before vocabularies.json existed are checked by size only, below): a reshuffled mapping of
    the same size embedded cells with other genes' embeddings, silently."""
    path = Path(ckpt) / VOCABULARIES
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise TrainError(path, "is not a JSON object of species.", "Use another checkpoint of the run.")
    for sp, vocab in vocabs.items():
        if recorded.get(sp) not in (None, vocab.fingerprint):
            raise TrainError(
                vocab.path,
                f"is not the {sp} token mapping this model was trained with (the same genes would map "
                f"to other tokens: its content differs from the one recorded in {path}).",
                f"Restore the mapping the run was trained with in {mappings} (PATH.GENE_MAPPINGS_PATH).",
            )


def _check_sums(checkpoint: Path) -> None:
    """The shareable files of a checkpoint match checksums.json (when it has model.safetensors)."""
    if not (Path(checkpoint) / WEIGHTS).is_file():
        return
    name = damage(checkpoint, only=(WEIGHTS, MODEL_JSON, CONFIG, VOCABULARIES))
    if name is not None:
        raise TrainError(
            Path(checkpoint) / name,
            "does not match the checksum recorded when the checkpoint was written: it is damaged (or was altered).",
            "Use another checkpoint of the run, or copy it again.",
        )


def read_weights(checkpoint: Path, sums_checked: bool = False) -> dict:
    """The checkpoint's full weights from `model.safetensors` (a TrainError when it has none),
    checked against checksums.json unless the caller did (`sums_checked`: hashing hundreds of MB
    of weights once is enough)."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / WEIGHTS
    if not sums_checked:
        _check_sums(checkpoint)
    if not path.is_file():
        raise TrainError(
            checkpoint,
            f"has no {WEIGHTS}: it was written before checkpoints carried shareable weights, or it is damaged.",
            "Resume its run once (initialize.resume=True, one more step) to write one, or, if you "
            "trust where it came from, load it with trust_pickle=True (concept-embed "
            "--trust-checkpoint).",
        )
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise TrainError(
            path,
            f"cannot be read ({type(exc).__name__}: {exc}).",
            "The file is damaged: use another checkpoint of the run.",
        ) from None
    for name, tensor in weights.items():  # a model of NaN weights embedded to 100% NaN, exit 0
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainError(
                path,
                f"holds non-finite values (NaN or infinity) in {name}.",
                "Use an earlier checkpoint of the run (training refuses to write such weights, so this "
                "one was altered or written elsewhere).",
            )
    return weights


def _model_config(ckpt: Path, weights: dict) -> ModelConfig:
    """The architecture in the checkpoint's model.json, checked field by field, and held against the
    weights' shapes on the meta device before any memory is allocated for it (a model.json with
    huge dimensions allocated gigabytes before failing)."""
    path = ckpt / MODEL_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(path, f"cannot be read as JSON ({exc}).", "Use another checkpoint of the run.") from None
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    problem = None
    if not isinstance(data, dict):
        problem = "does not hold a JSON object"
    elif set(data) - set(fields):
        problem = f"has unknown keys {sorted(set(data) - set(fields))}"
    else:
        for key, value in data.items():
            kind = fields[key].type
            if key == "vocab_sizes":
                good = isinstance(value, dict) and all(isinstance(k, str) and whole(v, 1) for k, v in value.items())
            elif kind in ("int", "int | None"):
                good = (value is None and kind != "int") or (whole(value, 1))
            elif kind in ("float", "float | None"):
                good = (value is None and kind != "float") or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                )
            elif kind == "bool":
                good = isinstance(value, bool)
            else:
                good = isinstance(value, str)
            if not good:
                problem = f"has {key}={value!r}, not a valid value of a {kind}"
                break
    if problem is None:
        try:
            mcfg = ModelConfig(**data)
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in ContrastiveModel(mcfg).state_dict().items()}
        except (TypeError, ValueError, RuntimeError) as exc:
            problem = f"describes no model this code can build ({type(exc).__name__}: {exc})"
        else:
            wrong = [k for k, v in weights.items() if k in shapes and tuple(v.shape) != shapes[k]]
            if wrong:
                problem = (
                    f"describes tensors of other shapes than the weights hold (first: {wrong[0]}: "
                    f"{shapes[wrong[0]]} here, {tuple(weights[wrong[0]].shape)} in {WEIGHTS})"
                )
    if problem is not None:
        raise TrainError(path, f"{problem}.", "The checkpoint is damaged or was altered: use another one of the run.")
    return mcfg


@dataclass
class LoadedModel:
    model: ContrastiveModel  # in eval mode
    cfg: Root  # the run's config.yaml, in the current schema
    run_id: str
    step: int
    checkpoint: Path
    vocabs: dict[str, Vocabulary]  # the run's species -> token mapping, loaded once

    def provenance(self, species: str) -> dict:
        """What `uns["concept"]` records of the model beside embeddings made with it: the run, the
        step, the checkpoint and the digest of its weights (checksums.json's, when it has one)."""
        out = {"run_id": self.run_id, "step": self.step, "species": species, "checkpoint": str(self.checkpoint)}
        try:
            digest = json.loads((Path(self.checkpoint) / CHECKSUMS).read_text()).get(WEIGHTS)
        except (OSError, ValueError, AttributeError):
            digest = None
        if isinstance(digest, str):
            out["weights_digest"] = digest
        return out


def load_model(run_or_checkpoint, device=None, trust_pickle: bool = False) -> LoadedModel:
    """A run directory (its latest checkpoint), a `checkpoints/step_<N>` directory or a scConcept
    model directory (concept_train/scconcept/model_dir.py) -> model in eval mode. Reads the
    checkpoint's own `model.json`, `config.yaml` and `model.safetensors`: no pickle,
    so a model from elsewhere runs no code. Checkpoints older than those files load through DCP only
    with `trust_pickle=True`."""
    path = Path(run_or_checkpoint)
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        from ..scconcept import model_dir as scconcept_dir

        if scconcept_dir.is_model_dir(path):  # one of scConcept's published models
            return scconcept_dir.load(path, device=device, trust_pickle=trust_pickle)
        raise TrainError(
            path,
            "is neither a run directory with a complete checkpoint, a checkpoint directory, nor a "
            "scConcept model directory (model.ckpt, config.yaml, gene_mappings/).",
            "Pass PATH.CHECKPOINT_ROOT/<run_id>, .../checkpoints/step_<N> or a scConcept model directory.",
        )
    run_dir = ckpt.parent.parent
    shareable = (ckpt / WEIGHTS).is_file() or not trust_pickle
    if shareable:
        _check_sums(ckpt)  # before any of its files is parsed
    cfg = typed_config(load_config_yaml(ckpt / CONFIG if (ckpt / CONFIG).is_file() else run_dir / CONFIG))
    vocabs = {sp: load_vocabulary(Path(cfg.PATH.GENE_MAPPINGS_PATH), sp) for sp in cfg.datamodule.species}
    _check_vocabularies(ckpt, vocabs, cfg.PATH.GENE_MAPPINGS_PATH)
    sizes = {sp: v.size for sp, v in vocabs.items()}
    if shareable:
        weights = read_weights(ckpt, sums_checked=True)  # checked above, before any file was parsed
        mcfg = (
            _model_config(ckpt, weights) if (ckpt / MODEL_JSON).is_file() else ModelConfig.from_run_config(cfg, sizes)
        )
        if mcfg.vocab_sizes != sizes:
            raise TrainError(
                ckpt,
                f"was trained with vocabularies of {mcfg.vocab_sizes} tokens, but the token "
                f"mappings in {cfg.PATH.GENE_MAPPINGS_PATH} now have {sizes}.",
                "Restore the token mappings the run was trained with.",
            )
        model = ContrastiveModel(mcfg)
        try:
            model.load_weights(weights)
        except RuntimeError as exc:
            raise TrainError(
                ckpt,
                f"holds weights that do not fit its model.json ({exc}).",
                "The checkpoint is damaged or was altered: use another checkpoint of the run.",
            ) from None
    else:
        model = ContrastiveModel(ModelConfig.from_run_config(cfg, sizes))
        saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        state = {
            "model": {
                k: v
                for k, v in model.state_dict().items()
                if f"model.{k}" in saved or not k.startswith(OPTIONAL_PREFIXES)
            }
        }
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt))
        model.load_weights(state["model"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_json = json.loads((ckpt / "trainer_state.json").read_text())
    return LoadedModel(
        model.to(device).eval(), cfg, str(state_json.get("run_id", run_dir.name)), int(state_json["step"]), ckpt, vocabs
    )
