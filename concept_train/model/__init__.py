"""The contrastive encoder (model.py), its varlen attention paths (attention.py) and the loss (loss.py)."""

from .loss import ContrastiveObjective, contrastive_loss, estimate_mutual_information, retrieval_metrics
from .model import ContrastiveModel, ModelConfig

__all__ = ["ContrastiveModel", "ContrastiveObjective", "ModelConfig", "contrastive_loss", "estimate_mutual_information", "retrieval_metrics"]
