"""AdamW without weight decay on embedding tables (and norms, biases), and the LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, training) -> torch.optim.Optimizer:
    name = str(training.get("optimizer_class", "AdamW"))
    if name != "AdamW":
        raise ValueError(f"model.training.optimizer_class={name}: only AdamW is supported")
    decay, no_decay = [], []
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params or p.ndim < 2 or pname.endswith("logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    wd = float(training.get("weight_decay", 0.0))
    if float(training.lr) < 0 or wd < 0:
        raise ValueError(f"model.training.{'lr' if float(training.lr) < 0 else 'weight_decay'}: must not be negative")
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=float(training.lr), betas=(0.9, 0.999))


def lr_lambda(training):
    """Multiplier of the base LR at an optimizer step: linear warm-up, then constant (`warmup`) or
    cosine decay to `min_lr` at `max_steps` (`warmup_cosine`)."""
    kind = str(training.get("scheduler", "warmup"))
    warmup = max(0, int(training.get("warmup", 0)))
    max_steps = int(training.max_steps)
    lr = float(training.lr)
    floor = float(training.get("min_lr", 0.0)) / lr if lr > 0 else 0.0     # lr 0: a frozen run
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
