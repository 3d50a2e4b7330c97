"""scConcept's published model directories, read as a model of ours (docs/migrating.md).

A model directory as scConcept publishes one (and as `concept-export` writes one): `model.ckpt`
(a Lightning checkpoint, or a Fabric one: `{model: state_dict, ...}`), `config.yaml` (its training
config, unresolved), `gene_mappings/<species>.csv` (gene_id, gene_name, token; <cls> 0, <pad> 1),
optional `panels/` and `pretrained_vocabulary/` (the pretrained tables themselves are in the
checkpoint). The checkpoint is read with torch's weights-only unpickler: a file that needs any other
Python object is refused unless the caller trusts it (`trust_pickle`). The model is ours with
`scconcept_layout`, so `embed()`, `concept-embed` and `concept-eval` use it as they use a run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from omegaconf import OmegaConf

from concept_shard.config import typed_config
from concept_shard.errors import TrainError
from concept_shard.vocabulary import load_vocabulary

from ..model.model import ContrastiveModel
from ..trainer.checkpoint import LoadedModel, load_config_yaml
from . import weights as W

CKPT, CONFIG, MAPPINGS = "model.ckpt", "config.yaml", "gene_mappings"
PANELS, PRETRAINED = "panels", "pretrained_vocabulary"


def is_model_dir(path) -> bool:
    """A scConcept model directory, or its `model.ckpt` named directly."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        path = path.parent
    return (path / CKPT).is_file() and (path / CONFIG).is_file()


def read_state(path: Path, trust_pickle: bool = False) -> tuple[dict, int]:
    """(the model's state dict, its global step) from a Lightning or Fabric checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(path, "does not exist.", "Give the model's checkpoint file (model.ckpt).")
    refused = None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        refused = str(exc).strip().splitlines()[0][:300]
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if refused is not None:
        if not trust_pickle:
            raise TrainError(
                path,
                f"holds Python objects beyond tensors and plain values, which a weights-only load refuses "
                f"(torch: {refused}): loading it would run code from the file.",
                "If you trust where it came from, load it with trust_pickle=True (concept-embed --trust-checkpoint).",
            )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a trusted file can still be damaged: name it all the same
            raise _unreadable(path, exc) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):  # Lightning
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):  # Fabric (train_fabric.py)
        state = ckpt["model"]
    else:
        raise TrainError(
            path,
            "holds neither a Lightning checkpoint (`state_dict`) nor a Fabric one (`model`).",
            "Give scConcept's model.ckpt.",
        )
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise TrainError(path, f"holds {name} that is no tensor.", "The file is damaged: copy it again.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainError(
                path, f"holds non-finite values (NaN or infinity) in {name}.", "Use another checkpoint of the model."
            )
    step = ckpt.get("global_step", 0)
    return state, int(step) if isinstance(step, int) else 0


def _unreadable(path: Path, exc: BaseException) -> TrainError:
    return TrainError(
        path,
        f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {str(exc).split('. ')[0][:200]}).",
        "The file is damaged or not a checkpoint: download or copy it again.",
    )


def _config(path: Path, mappings: Path, model_dir: Path | None):
    """Its config.yaml with the PATH keys pointed at the model's own files, and the model keys it
    lacks filled as scConcept fills them."""
    raw = load_config_yaml(path)
    OmegaConf.set_struct(raw, False)
    if "PATH" not in raw or raw.PATH is None:
        raw.PATH = {}
    home = model_dir or mappings.parent
    raw.PATH.PROJECT_PATH = str(home)
    raw.PATH.GENE_MAPPINGS_PATH = str(mappings)
    for key in ("GENE_MAPPING_PATH", "GENE_MAPPING_PATHS"):
        raw.PATH.pop(key, None)
    raw.PATH.PRETRAINED_VOCABULARY = str(home / PRETRAINED) if (home / PRETRAINED).is_dir() else None
    raw.PATH.PANELS_PATH = str(home / PANELS)
    if not OmegaConf.is_dict(raw.get("model")):
        raise TrainError(path, "has no model section.", "Use the config.yaml the model was published with.")
    for key, value in W.FILLED.items():
        if key not in raw.model:
            raw.model[key] = value
    raw.model.layout = "scconcept"
    _drop_unknown_keys(raw, path)
    return raw


def _drop_unknown_keys(raw, path: Path) -> None:
    """Keys of a later (or private) scConcept version that this code does not know: outside the
    architecture they are left out, in one line on stderr; an unknown architecture key (`model.*`
    but `model.training.*`) may change what the model computes, so it is refused."""
    import sys

    from concept_config import Root
    from concept_config.project import split_node
    from concept_shard.strict import unknown_keys

    unknown = [k for k, _ in unknown_keys(raw, Root, dynamic=split_node)]
    architecture = [k for k in unknown if k.startswith("model.") and not k.startswith("model.training.")]
    if architecture:
        raise TrainError(
            path,
            f"sets model keys this code does not know ({', '.join(architecture[:5])}): they may change what "
            "the model computes.",
            "Use a scConcept model of sc-concept 0.2.x, or report the keys so that they can be read.",
        )
    for key in unknown:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(raw, parent) if parent else raw
        del node[leaf]
    if unknown:
        print(f"[model] {path}: keys unknown here, left out: {', '.join(unknown)}", file=sys.stderr)


def load(
    model_dir=None,
    *,
    config=None,
    model_path=None,
    gene_mappings_path=None,
    device=None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """A scConcept model as a LoadedModel: a model directory, or its files named one by one as
    scConcept's `load_config_and_model(config=, model_path=, gene_mappings_path=)` takes them."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        if model_dir.is_file():
            model_path, model_dir = model_path or model_dir, model_dir.parent
        config = config or model_dir / CONFIG
        model_path = model_path or model_dir / CKPT
        gene_mappings_path = gene_mappings_path or model_dir / MAPPINGS
    if config is None or model_path is None or gene_mappings_path is None:
        raise TrainError(
            "scConcept model",
            "needs its config, checkpoint and gene mappings.",
            "Give the model directory, or config=, model_path= and gene_mappings_path= together.",
        )
    config, model_path, mappings = Path(config), Path(model_path), Path(gene_mappings_path)
    raw = _config(config, mappings, model_dir)
    try:
        cfg = typed_config(raw)
    except Exception as exc:  # ConfigError names the key; say which file it is in
        raise TrainError(
            config, f"is not a config this code can read ({exc}).", "Use the model's own config.yaml."
        ) from None
    state, step = read_state(model_path, trust_pickle)
    vocabs = {sp: load_vocabulary(mappings, sp) for sp in cfg.datamodule.species}
    ours, table = W.to_ours(state, model_path)
    sizes = {sp: v.size for sp, v in vocabs.items()}
    for sp, size in sizes.items():
        key = ("learnable_embeddings" if W.has_pretrained(state) else "gene_embeddings") + f".{sp}.weight"
        rows = ours.get(key)
        if rows is None or rows.shape[0] != size:
            raise TrainError(
                mappings,
                f"gives species '{sp}' {size} tokens, but {model_path} has "
                + (f"a table of {rows.shape[0]}." if rows is not None else "no table for it."),
                "Use the gene mappings published with this model.",
            )
    mcfg = W.model_config(OmegaConf.to_container(raw.model, resolve=True), state, sizes, config)
    model = ContrastiveModel(mcfg)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as exc:
        raise TrainError(
            model_path,
            f"holds weights that do not fit the architecture in {config} ({str(exc).splitlines()[1].strip()[:300]}).",
            "Use the config.yaml published with this checkpoint.",
        ) from None
    if table is not None:
        if tuple(table.shape) != tuple(model.rank_table.shape):
            raise TrainError(
                model_path,
                f"has a position table of {tuple(table.shape)}, the config's model.pe_max_len and dim_model "
                f"make {tuple(model.rank_table.shape)}.",
                "Use the config.yaml published with this checkpoint.",
            )
        model.rank_table = table  # its own float32 table, bit for bit
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = (model_dir or model_path.parent).name
    return LoadedModel(model.to(device).eval(), cfg, name, step, model_path, vocabs)
