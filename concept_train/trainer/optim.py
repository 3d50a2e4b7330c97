"""AdamW (or Adam) without weight decay on embedding tables (and norms, biases), and the LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from concept_config.training import OPTIMIZER_CLASSES, TrainingKeys
from concept_shard.errors import TrainError

# `model.training.optimizer_class`: scConcept's two. AdamW decays the weights directly (decoupled);
# Adam adds weight_decay x weight to the gradient (L2), as torch.optim.Adam does in the reference.
# Keyed by the schema's choices: a choice without its torch class fails here, at import.
OPTIMIZERS = {name: getattr(torch.optim, name) for name in OPTIMIZER_CLASSES}


def build_optimizer(model: nn.Module, training: TrainingKeys) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require a gradient (frozen tables, or all
    but the learnable tables under train_vocab_only, are left out). The schema checked the
    optimizer's name and that lr and weight_decay are >= 0."""
    decay, no_decay = [], []
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params or p.ndim < 2 or pname.endswith("logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    wd = training.weight_decay
    if not decay and not no_decay:
        raise TrainError(
            "model.training",
            "leaves no parameter to train (everything is frozen).",
            "Unset train_vocab_only or freeze_pretrained_vocabulary, or train with gene tables.",
        )
    # no empty group (train_vocab_only leaves no weight matrix): torch's distributed state dict
    # cannot load optimizer states into groups without parameters
    groups = [
        g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
    ]
    return OPTIMIZERS[training.optimizer_class](groups, lr=training.lr, betas=(0.9, 0.999))


def lr_lambda(training: TrainingKeys):
    """Multiplier of the base LR at an optimizer step: linear warm-up, then constant (`warmup`) or
    cosine decay to `min_lr` at `max_steps` (`warmup_cosine`; the schema checked the name)."""
    kind, warmup, max_steps, lr = training.scheduler, training.warmup, training.max_steps, training.lr
    floor = training.min_lr / lr if lr > 0 else 0.0  # lr 0: a frozen run

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
