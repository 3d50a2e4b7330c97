"""The contrastive encoder (model.py), its varlen attention paths (attention.py) and the loss (loss.py).
Names are imported on first use (see concept_train/__init__.py)."""

from concept_train.lazy import lazy_names

_HOMES = {
    "ContrastiveObjective": ".loss",
    "contrastive_loss": ".loss",
    "estimate_mutual_information": ".loss",
    "retrieval_metrics": ".loss",
    "ContrastiveModel": ".model",
    "ModelConfig": ".model",
}
__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES)
