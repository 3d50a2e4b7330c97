"""The config keys of the training run (`model.training`, `wandb`, `initialize`, `profiler`):
types, ranges and defaults, here only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .fields import key


def _limit(value) -> str | None:
    if isinstance(value, bool):
        return "must be a fraction in (0, 1] of an epoch or a number of batches >= 1"
    if isinstance(value, float) and 0 < value <= 1 or isinstance(value, int) and value >= 1:
        return None
    return "must be a fraction in (0, 1] of an epoch or a number of batches >= 1"


def _resume(value) -> str | None:
    return None if value in RESUME_MODES and type(value) in (bool, str) else "must be true, false or auto"


def _steps(value) -> str | None:
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    if isinstance(value, float) and 0 < value <= 1:
        return None  # a fraction of a training epoch, as in Lightning (scConcept's trees say 1.0)
    if isinstance(value, float):
        return (
            "is neither a number of optimizer steps (an integer, null = never) nor a fraction of a "
            "training epoch in (0, 1] (Lightning's float)"
        )
    return "must be a number of steps >= 0, a fraction of an epoch in (0, 1], or null"


OPTIMIZER_CLASSES = ("AdamW", "Adam")  # trainer/optim.py maps each to its torch class
SCHEDULERS = ("warmup", "warmup_cosine")
RESUME_MODES = (True, False, "auto")


@dataclass
class TrainingKeys:
    lr: float = key(1e-4, "peak learning rate", ge=0)
    weight_decay: float = key(0.0, "AdamW weight decay on weight matrices", ge=0)
    optimizer_class: str = key("AdamW", "AdamW | Adam", choices=OPTIMIZER_CLASSES)
    scheduler: str = key("warmup", "warmup | warmup_cosine", choices=SCHEDULERS)
    min_lr: float = key(0.0, "the floor of warmup_cosine", ge=0)
    warmup: int = key(10000, "warm-up steps", ge=0)
    max_steps: int = key(100000, "train until this step", ge=0)
    accumulate_grad_batches: int = key(1, "global batches per optimizer step", ge=1)
    gradient_clip_val: Optional[float] = key(1.0, "clip the global gradient norm; null/0 = off", ge=0)
    val_check_interval: Any = key(
        1000, "validate every N steps, or every fraction f in (0, 1] of an epoch; null/0 = never", check=_steps
    )
    check_val_every_n_epoch: Optional[int] = key(None, "validate after every N-th epoch; null = off", ge=1)
    validate_before_training: bool = key(True, "validate once at step 0 of a new run")
    log_every_n_steps: int = key(100, "a training row every N steps", ge=1)
    checkpoint_every_n_steps: Any = key(1000, "checkpoint every N steps; null/0 = only the final one", check=_steps)
    keep_last_checkpoints: int = key(3, "older step_<N> folders are deleted; 0 = keep all", ge=0)
    keep_best: Optional[str] = key(
        None, "a validation metric: the checkpoint with its best value is kept as checkpoints/best"
    )
    max_nonfinite_steps: int = key(
        3, "steps in a row with a non-finite loss or gradients (each not applied) before the run stops", ge=1
    )
    compile: bool = key(False, "torch.compile each encoder block")
    limit_train_batches: Any = key(1.0, "a fraction of an epoch's batches, or a count", check=_limit)
    masking_rate: float = key(0.0, "fraction of values masked for the MLM loss", ge=0, lt=1)
    freeze_pretrained_vocabulary: bool = key(False, "the pretrained gene tables get no gradient")
    use_learnable_embs_freq: Optional[float] = key(
        None, "fraction of steps adding the learnable residual tables", ge=0, le=1
    )
    train_vocab_only: bool = key(False, "train only the learnable gene tables")
    # scConcept's keys with no effect here
    devices: Any = key(1, inert="processes come from torchrun / srun (WORLD_SIZE, SLURM_NTASKS)")
    num_nodes: Any = key(1, inert="nodes come from torchrun / srun")
    accelerator: Optional[str] = key(None, inert="CUDA is used when present")
    resume_from_checkpoint: Any = key(False, inert="resuming is initialize.resume")


@dataclass
class WandbKeys:
    enabled: bool = key(False, "mirror every metrics row to wandb")
    run_name: Optional[str] = key(None, "the wandb display name; null = the run id")
    entity: Optional[str] = key(None, "the wandb entity")
    project: Optional[str] = key(None, "the wandb project; null = concept")


@dataclass
class InitializeKeys:
    resume: Any = key(False, "continue run_id from its latest checkpoint (auto: when it has one)", check=_resume)
    run_id: Optional[str] = key(None, "the run's folder name under PATH.CHECKPOINT_ROOT")
    checkpoint: Optional[str] = key(None, "weights from this run or checkpoint into a NEW run")
    create_new_run: bool = key(False, "confirms that initialize.checkpoint starts a new run")
    fresh_training: bool = key(False, "load weights and optimizer but restart the step count")


@dataclass
class ProfilerKeys:
    enabled: bool = key(False, "torch.profiler over training steps 2-4")
