"""A new run that continues one of scConcept's published models (`initialize.checkpoint=<its model
directory>` with `initialize.create_new_run=True`; `concept_train.adapt.train(model=...)`).

The model's architecture keys and `model.layout=scconcept` become the run's (logged, and recorded in
the run's config.yaml, so a resume builds the same model); its token mappings must be the ones the
run's shards were made with; its weights, and its own position table, are loaded before the model
is sharded. Its optimizer state is not read: the run starts a new one.
"""

from __future__ import annotations

from pathlib import Path

from concept_config import Root
from concept_shard.errors import TrainError
from concept_shard.vocabulary import load_vocabulary

from ..trainer.checkpoint import LoadedModel
from . import model_dir
from .weights import MODEL_KEYS


def adopt(cfg: Root, source: Path, log=print) -> LoadedModel:
    """Load the scConcept model at `source` and make `cfg` describe it (see module docstring)."""
    loaded = model_dir.load(source, device="cpu")
    mcfg = loaded.model.cfg
    for sp in cfg.datamodule.species:
        if sp not in loaded.vocabs:
            raise TrainError(
                "datamodule.species",
                f"has '{sp}', which the scConcept model {source} was not trained on (it has {sorted(loaded.vocabs)}).",
                "Continue it on its own species only.",
            )
        mine, theirs = load_vocabulary(Path(cfg.PATH.GENE_MAPPINGS_PATH), sp), loaded.vocabs[sp]
        if mine.fingerprint != theirs.fingerprint:
            raise TrainError(
                "PATH.GENE_MAPPINGS_PATH",
                f"gives species '{sp}' other tokens ({mine.path}) than the model {source} was trained with "
                f"({theirs.path}).",
                f"Shard with the model's mappings: PATH.GENE_MAPPINGS_PATH={theirs.path.parent}, then run "
                "concept-shard build again.",
            )
    wanted = {k: getattr(mcfg, k) for k in MODEL_KEYS}
    wanted["layout"] = "scconcept"
    changed = []
    for key, value in wanted.items():
        if getattr(cfg.model, key) != value:
            changed.append(f"model.{key}={value}")
            setattr(cfg.model, key, value)
    # the published model adds its learnable residual tables on this fraction of steps; a run that
    # leaves the key unset would never add them (and validate another model than it embeds)
    training, theirs = cfg.model.training, loaded.cfg.model.training.use_learnable_embs_freq
    if mcfg.pretrained and training.use_learnable_embs_freq is None and theirs is not None:
        training.use_learnable_embs_freq = theirs
        changed.append(f"model.training.use_learnable_embs_freq={theirs}")
    # the layout with or without pretrained tables follows PATH.PRETRAINED_VOCABULARY; a run from
    # weights never reads the vectors (the checkpoint has the tables)
    if mcfg.pretrained and not cfg.PATH.PRETRAINED_VOCABULARY:
        cfg.PATH.PRETRAINED_VOCABULARY = str(Path(loaded.checkpoint).parent / model_dir.PRETRAINED)
        changed.append(f"PATH.PRETRAINED_VOCABULARY={cfg.PATH.PRETRAINED_VOCABULARY}")
    elif not mcfg.pretrained and cfg.PATH.PRETRAINED_VOCABULARY:
        cfg.PATH.PRETRAINED_VOCABULARY = None
        changed.append("PATH.PRETRAINED_VOCABULARY=null")
    if changed:
        log(f"[train] the scConcept model {source} sets {len(changed)} key(s): {' '.join(changed)}")
    return loaded


def load_into(model, loaded: LoadedModel, where) -> None:
    """The published model's weights (and position table) into the run's freshly built model (not yet
    sharded). A decoder head comes along only when the run has one (MLM); a run with one that the
    model lacks keeps its new head."""
    mine = model.state_dict()
    weights = {k: v for k, v in loaded.model.state_dict().items() if k in mine or not k.startswith("decoder.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise TrainError(
            where,
            f"holds weights that do not fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]}).",
            "Leave the model's architecture keys as the model has them.",
        )
    model.rank_table = loaded.model.rank_table.clone()
