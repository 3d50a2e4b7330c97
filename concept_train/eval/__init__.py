"""Evaluation of a trained model (`concept-eval`, `evaluate()`): scIB metrics, kNN accuracy and
cross-view recall against baselines on the same cells, with UMAP pictures and a short report."""

from .evaluate import evaluate

__all__ = ["evaluate"]
