"""The contrastive encoder (model.py), its varlen attention paths (attention.py) and the loss (loss.py)."""

from .loss import contrastive_loss, estimate_mutual_information, retrieval_metrics
from .model import ContrastiveModel, GeneVectorWidthError, ModelConfig

__all__ = ["ContrastiveModel", "GeneVectorWidthError", "ModelConfig", "contrastive_loss", "estimate_mutual_information", "retrieval_metrics"]
