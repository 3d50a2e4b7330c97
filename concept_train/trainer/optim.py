"""AdamW (or Adam) without weight decay on embedding tables (and norms, biases), and the LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from concept_shard.errors import TrainError

# `model.training.optimizer_class`: scConcept's two. AdamW decays the weights directly (decoupled);
# Adam adds weight_decay x weight to the gradient (L2), as torch.optim.Adam does in the reference.
OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def build_optimizer(model: nn.Module, training) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require a gradient (frozen tables, or all
    but the learnable tables under train_vocab_only, are left out)."""
    name = str(training.optimizer_class)
    if name not in OPTIMIZERS:
        raise TrainError(f"model.training.optimizer_class={name}", "is not an optimizer this trainer has.",
                         f"Use one of {', '.join(OPTIMIZERS)} (AdamW is the default).")
    decay, no_decay = [], []
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params or p.ndim < 2 or pname.endswith("logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    wd = float(training.weight_decay)
    if float(training.lr) < 0 or wd < 0:
        raise ValueError(f"model.training.{'lr' if float(training.lr) < 0 else 'weight_decay'}: must not be negative")
    if not decay and not no_decay:
        raise TrainError("model.training", "leaves no parameter to train (everything is frozen).",
                         "Unset train_vocab_only or freeze_pretrained_vocabulary, or train with gene tables.")
    # no empty group (train_vocab_only leaves no weight matrix): torch's distributed state dict
    # cannot load optimizer states into groups without parameters
    groups = [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return OPTIMIZERS[name](groups, lr=float(training.lr), betas=(0.9, 0.999))


def lr_lambda(training):
    """Multiplier of the base LR at an optimizer step: linear warm-up, then constant (`warmup`) or
    cosine decay to `min_lr` at `max_steps` (`warmup_cosine`)."""
    kind = str(training.scheduler)
    warmup = int(training.warmup)
    max_steps = int(training.max_steps)
    lr = float(training.lr)
    floor = float(training.min_lr) / lr if lr > 0 else 0.0     # lr 0: a frozen run
    if kind not in ("warmup", "warmup_cosine"):
        raise ValueError(f"model.training.scheduler={kind}: use warmup or warmup_cosine")

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn
