"""The training loop, written out (no Lightning): one process, torchrun or srun; FSDP2 when there
is more than one process.

Per optimizer step: `accumulate_grad_batches` global batches -> both views in one forward pass ->
contrastive loss over the global batch (+ the MLM loss) -> backward -> clip -> AdamW/Adam ->
schedule. Every `log_every_n_steps` a metrics row, every `val_check_interval` steps and after every
`check_val_every_n_epoch`-th epoch validation, every `checkpoint_every_n_steps` (and at the end) a
checkpoint. Resuming restores model, optimizer, scheduler, step, RNG and the loader's position, so
the batch sequence and (on CPU) the losses continue exactly as if the run had not stopped.

Everything random that a step adds to its batch is a function of (seed, step, batch index, rank),
never of a global RNG: the MLM mask (`_mlm_mask`), the binary loss's negatives (loss.py), and
whether the step adds the learnable gene residual (`adds_learnable_embs`). Dropout is the one user
of torch's RNG, whose state every checkpoint saves.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from concept_config import Root
from concept_shard.config import as_dict
from concept_shard.errors import TrainError, UserError
from concept_shard.gene_vectors import GeneVectorWidthError, read_gene_vectors
from concept_shard.splits import check_plain_name
from concept_shard.vocabulary import CLS_TOKEN

from ..data import DataError, DataModule
from ..model import ContrastiveModel, ContrastiveObjective, ModelConfig
from ..model.model import (
    adds_learnable_embs,
    gene_positions,
    learnable_embs_freq,
    masking_rate,
    mlm_loss_on,
    pe_max_len_for,
)
from ..scconcept import model_dir as scconcept_dir
from .checkpoint import (
    check_layout,
    checkpoint_step,
    config_changes,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    resolve_checkpoint,
    save_checkpoint,
    write_config,
)
from .distributed import Dist, apply_fsdp, init_distributed, shutdown
from .metrics import MetricsLog, plot_curves
from .optim import build_optimizer, lr_lambda
from .preempt import StopSignals
from .runlock import RunLock
from .validate import validate

H100_BF16_PEAK_FLOPS = 989e12
MLM_STREAM = 0x6D6C6D  # the MLM mask's random stream, keyed [seed, MLM_STREAM, g, rank] (see loss.NEGATIVES_STREAM)


def validation_steps(val_check_interval, steps_per_epoch: int) -> int:
    """Optimizer steps between validations (0 = never): `val_check_interval` as a number of steps,
    or as a float in (0, 1], Lightning's fraction of a training epoch (scConcept's trees say 1.0:
    once an epoch)."""
    if isinstance(val_check_interval, float):
        return max(1, int(val_check_interval * steps_per_epoch))
    return val_check_interval or 0  # null or 0: never


def _broadcast(obj, d: Dist):
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _no_checkpoint(run_dir: Path) -> TrainError:
    """A resume finds no complete checkpoint: starting the run anew would overwrite what is there."""
    if run_dir.exists():
        return TrainError(
            run_dir,
            "has no complete checkpoint to resume from (none whose files match their checksums).",
            "Check initialize.run_id; to train from scratch, start a new run with another "
            "initialize.run_id (this one's directory is kept as it is).",
        )
    return TrainError(
        run_dir,
        "has no complete checkpoint to resume from: there is no such run.",
        "Check initialize.run_id and PATH.CHECKPOINT_ROOT, or start a new run without initialize.resume.",
    )


class Trainer:
    def __init__(self, cfg: Root, log=print):
        self.cfg, self.d = cfg, init_distributed()
        self.log = log if self.d.is_main else (lambda *a, **k: None)
        self.training = cfg.model.training
        self.objective = ContrastiveObjective.from_config(cfg.model, seed=cfg.seed)
        self._read_options()
        self.scconcept_source: Path | None = None  # initialize.checkpoint names a scConcept model
        self.run_id, self.run_dir, self.resume_from, self.weights_from = self._resolve_run()
        self.run_lock = self._lock_run()
        self.scconcept = self._adopt_scconcept()
        if self.scconcept is not None:
            self._read_options()  # its architecture keys are the run's now: check them again
        self.fresh = self.resume_from is None and self.weights_from is not None and cfg.initialize.fresh_training
        self._report_changes()
        self._record_config()
        self._build()
        self._restore()
        self.metrics = MetricsLog(
            self.run_dir,
            cfg.wandb,
            as_dict(cfg),
            self.d.is_main,
            self.run_id,
            log=self.log,
            resumed_at=self.step if self.resume_from is not None else None,
            max_steps=self.training.max_steps,
        )
        self.lineage = self._lineage()

    # ---- set-up -----------------------------------------------------------------------------
    def _read_options(self) -> None:
        """The training keys that change what a step computes (types and ranges are the schema's,
        concept_config/training.py); combinations checked here, named when wrong."""
        model = self.cfg.model
        self.residual_freq = learnable_embs_freq(model)
        rate = masking_rate(model)
        if rate > 0 and model.input_encoding != "value_encoding":
            raise TrainError(
                f"model.training.masking_rate={rate}",
                "masks values, but model.input_encoding="
                f"{model.input_encoding} does not embed values (only their rank): masking "
                "would change nothing the model sees.",
                "Use model.input_encoding=value_encoding, or model.training.masking_rate=0.",
            )
        self.masking_rate = rate
        self.mask_value = model.mask_value
        self.mlm_weight = model.mlm_loss_weight
        self.mlm = mlm_loss_on(model)
        if self.mlm_weight > 0 and rate == 0:
            self.log(
                f"[train] WARNING: model.mlm_loss_weight={self.mlm_weight} but model.training.masking_rate=0: "
                "no value is masked, so there is no MLM loss (set masking_rate, e.g. 0.15, with value_encoding)"
            )
        self.val_every_epochs = self.training.check_val_every_n_epoch
        self._check_positions()

    def _check_positions(self) -> None:
        """Views of more genes than the rank encoding tells apart would give the genes ranked
        beyond one shared position (the table's last row), silently: named instead."""
        model, dataset = self.cfg.model, self.cfg.datamodule.dataset
        held = gene_positions(model.input_encoding, model.pe_max_len, model.layout == "scconcept")
        if held is None:
            return
        wants = {"datamodule.dataset.train.max_tokens": dataset.train.max_tokens}
        wants |= {
            f"datamodule.dataset.val.{k}.max_tokens": v.max_tokens for k, v in dataset.val.items() if v.max_tokens
        }
        for key, n in wants.items():
            if n > held:
                raise TrainError(
                    key,
                    f"is {n}, but model.pe_max_len {model.pe_max_len} lets the rank encoding tell apart "
                    f"{held} gene positions: the genes ranked beyond would share one.",
                    f"Set model.pe_max_len >= {pe_max_len_for(n, model.layout == 'scconcept')}, or lower {key}.",
                )

    def _report_changes(self) -> None:
        """The keys changed since the checkpoint this run resumes, or whose optimizer state it loads
        (fresh_training); `config_changes` refuses a changed architecture."""
        if self.resume_from is not None:
            changed = config_changes(self.resume_from, self.cfg)
            if changed:
                self.log(
                    f"[train] resuming with {len(changed)} key(s) changed since the checkpoint: " + ", ".join(changed)
                )
            if self.cfg.initialize.fresh_training:
                self.log("[train] initialize.fresh_training is ignored on a resume: the run continues at its step")
        elif self.fresh:  # weights and optimizer state: the same model is needed
            changed = config_changes(self.weights_from, self.cfg, fresh=True)
            if changed:
                self.log(
                    f"[train] fresh training from {self.weights_from} with {len(changed)} key(s) changed: "
                    + ", ".join(changed)
                )

    def _record_config(self) -> None:
        """The run's folder and its config: `config.yaml` as the run started; a resume records its
        own (overrides may differ)."""
        if self.d.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            name = (
                f"config.resume_step{checkpoint_step(self.resume_from)}.yaml"
                if self.resume_from is not None
                else "config.yaml"
            )
            write_config(self.cfg, self.run_dir / name)
        self.d.barrier()
        how = (
            f"{self.d.world_size} processes, FSDP2 over {'nccl' if self.d.device.type == 'cuda' else 'gloo'}"
            if self.d.world_size > 1
            else "1 process"
        )
        self.log(f"[train] run {self.run_id} in {self.run_dir}: {how}, device {self.d.device.type}")

    def _build(self) -> None:
        """The data module and its loaders, the model, the optimizer and its LR schedule."""
        self.data = DataModule(self.cfg, rank=self.d.rank, world_size=self.d.world_size, log=self.log)
        self.train_loader = self.data.train_loader()
        self.val_loaders = self.data.val_loaders()
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, self.training)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.training))
        self.step = 0
        # model.training.keep_best: {metric, value, step, checkpoint} of the best validation so far
        self.best: dict | None = None
        self._best_missing_said = False
        self.nonfinite_steps = 0  # steps in a row not applied (non-finite loss or gradients)
        self._dense_params: int | None = None

    def _restore(self) -> None:
        """What the run starts from: all of a checkpoint's state on a resume; weights and optimizer
        state with fresh_training; weights only into a new run (initialize.checkpoint)."""
        if self.resume_from is not None:
            check_layout(self.resume_from, self.model.cfg)
            state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.d)
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.train_loader.load_state_dict(state["loader"])
            self.best = state.get("best")
            self.log(f"[train] resumed run {self.run_id} from {self.resume_from} (step {self.step})")
        elif self.fresh:
            self._load_fresh(self.weights_from)
        elif self.scconcept is not None:  # its weights went in before the model was sharded
            self.log(
                f"[train] new run {self.run_id} starts from the weights of scConcept model {self.weights_from} "
                f"(its step {self.scconcept.step})"
            )
        elif self.weights_from is not None:
            load_checkpoint(self.weights_from, self.model, self.optimizer, self.d, weights_only=True)
            self.log(f"[train] new run {self.run_id} starts from the weights of {self.weights_from}")

    def _adopt_scconcept(self):
        """A run from one of scConcept's models: its architecture becomes the run's
        (scconcept/continued.py). Returns the loaded model for a new run (its weights go in before
        sharding), None otherwise; a resume whose command still names the model takes its
        architecture too (the weights come from the run's checkpoint)."""
        from ..scconcept import continued

        source = self.scconcept_source
        named = self.cfg.initialize.checkpoint
        if source is None and self.resume_from is not None and named and scconcept_dir.is_model_dir(named):
            continued.adopt(self.cfg, Path(named), log=self.log)
            return None
        if source is None:
            return None
        return continued.adopt(self.cfg, source, log=self.log)

    def _lineage(self):
        """The run as a tracked lamindb run (`lamindb.enabled`, rank 0 only), its inputs registered."""
        if not (self.d.is_main and self.cfg.lamindb.enabled):
            return None
        from .lineage import TrainLineage

        lineage = TrainLineage(self.cfg, self.run_id, self.run_dir, self.resume_from)
        lineage.add_inputs(self.data.catalog.all_sets())
        return lineage

    def _load_fresh(self, path: Path) -> None:
        """`initialize.fresh_training`: weights and optimizer state (Adam's moments) from `path`; the
        step, the LR schedule (warm-up included) and the data position start at 0, as a new run's:
        the batch sequence stays a function of (seed, batch index) from 0, so this run resumes
        exactly like any other, and the old loader state need not fit the new data config. The
        optimizer's hyperparameters (lr, betas, weight decay) are this config's, and torch's RNG is
        seeded anew rather than restored."""
        check_layout(path, self.model.cfg)
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        load_checkpoint(path, self.model, self.optimizer, self.d, rng=False)
        for group, mine in zip(self.optimizer.param_groups, hyper):
            group.update(mine)
        self.log(
            f"[train] new run {self.run_id} starts from the weights and optimizer state of {path} "
            "(initialize.fresh_training: step 0, schedule and data from their start)"
        )

    def _resolve_run(self) -> tuple[str, Path, Path | None, Path | None]:
        """(run id, run directory, the checkpoint a resume continues, the checkpoint whose weights a
        new run starts from)."""
        init = self.cfg.initialize
        root = Path(self.cfg.PATH.CHECKPOINT_ROOT)
        # a folder under PATH.CHECKPOINT_ROOT, never a path out of it
        run_id = check_plain_name(init.run_id, "initialize.run_id", TrainError) if init.run_id else None
        if init.resume is True and init.create_new_run:
            return self._new_run_from_run(root, run_id)
        resume_from = self._resume_target(root, run_id)
        if resume_from is not None:
            return run_id, root / run_id, resume_from, None
        weights_from = self._weights_source()
        run_id = self._new_run(root, run_id)
        return run_id, root / run_id, None, weights_from

    def _new_run_from_run(self, root: Path, run_id: str | None) -> tuple[str, Path, None, Path]:
        """scConcept's `initialize.resume=True create_new_run=True run_id=R checkpoint=C`: a NEW run
        (its id the start time) from the weights of run R's checkpoint C: `last.ckpt` / `last` /
        unset for R's latest intact checkpoint, `step_<N>` for that one. (It silently extended R.)"""
        init = self.cfg.initialize
        if not run_id:
            raise TrainError(
                "initialize.create_new_run",
                "with initialize.resume=True starts a new run from a run's checkpoint, but initialize.run_id "
                "(that run) is not set.",
                "Pass initialize.run_id=<the run to start from>, or initialize.checkpoint=<its directory> "
                "without initialize.resume.",
            )
        source = root / run_id
        name = str(init.checkpoint or "last.ckpt")
        if name in ("last.ckpt", "last", "latest"):
            found = _broadcast(intact_checkpoint(source, self.log) if self.d.is_main else None, self.d)
        else:
            found = resolve_checkpoint(source / "checkpoints" / Path(name).name)
        if found is None:
            steps = sorted(p.name for p in (source / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
            raise TrainError(
                f"initialize.checkpoint={name}",
                f"names no complete checkpoint of run {run_id} in {root} (it has: {steps or 'none'}).",
                "Use last.ckpt (its latest checkpoint) or one of its step_<N>.",
            )
        new_id = self._new_run(root, None)
        self.log(
            f"[train] initialize.resume=True with create_new_run=True (scConcept's meaning): new run {new_id}, "
            f"starting from the weights of run {run_id}'s {found.name}"
        )
        return new_id, root / new_id, None, found

    def _lock_run(self) -> RunLock:
        """The run directory's lock (runlock.py), taken by the main process before anything is written."""
        lock = RunLock(self.run_dir)
        holder = _broadcast(lock.acquire() if self.d.is_main else None, self.d)
        if holder is not None:
            raise TrainError(
                self.run_dir,
                f"is in use by another concept-train ({holder}): two writers would mix its metrics and "
                "checkpoints, so this one stops before writing anything.",
                "Let that run end (or stop it) and start this one again; to train beside it, choose another "
                "initialize.run_id.",
            )
        return lock

    def _resume_target(self, root: Path, run_id: str | None) -> Path | None:
        """The checkpoint `initialize.resume` continues, or None for a new run. Rank 0 checks the
        checksums and picks; every rank resumes from the same checkpoint."""
        resume = self.cfg.initialize.resume
        if resume == "auto":
            # what train.sbatch passes, so that a requeued job continues its run whatever config
            # file set the run id and PATH.CHECKPOINT_ROOT: resume the run when it has a
            # checkpoint, else start it
            if not run_id:
                self.log(
                    "[train] initialize.resume=auto without initialize.run_id: starting a new run (set "
                    "initialize.run_id for a resubmitted job to continue it)"
                )
                return None
            found, has_any = _broadcast(
                (intact_checkpoint(root / run_id, self.log), latest_checkpoint(root / run_id) is not None)
                if self.d.is_main
                else None,
                self.d,
            )
            resume = found is not None or has_any  # a damaged run is not started over
            self.log(
                f"[train] initialize.resume=auto: run {run_id} in {root} "
                + ("has a checkpoint: resuming it" if resume else "has no checkpoint yet: starting it")
            )
            if not resume:
                return None
        elif not resume:
            return None
        elif not run_id:
            raise TrainError(
                "initialize.resume",
                "is true but initialize.run_id is not set.",
                "Pass initialize.run_id=<the run's id> (its folder under PATH.CHECKPOINT_ROOT).",
            )
        else:
            found = _broadcast(intact_checkpoint(root / run_id, self.log) if self.d.is_main else None, self.d)
        if found is None:
            raise _no_checkpoint(root / run_id)
        return found

    def _weights_source(self) -> Path | None:
        """The checkpoint `initialize.checkpoint` names: its weights (with fresh_training, and its
        optimizer state) start a NEW run."""
        init = self.cfg.initialize
        if not init.checkpoint:
            if init.fresh_training:
                raise TrainError(
                    "initialize.fresh_training",
                    "is true but initialize.checkpoint is not set.",
                    "Point initialize.checkpoint at the run (or checkpoint) whose weights and optimizer "
                    "state the new run starts from.",
                )
            return None
        path = Path(init.checkpoint)
        weights_from = resolve_checkpoint(path)
        if weights_from is None and scconcept_dir.is_model_dir(path):
            if init.fresh_training:
                raise TrainError(
                    "initialize.fresh_training",
                    f"takes a checkpoint's optimizer state too, but {path} is a scConcept model, whose "
                    "optimizer state is not read.",
                    "Use initialize.create_new_run=True: the run starts from its weights with a new optimizer.",
                )
            self.scconcept_source = weights_from = path
        if weights_from is None:
            raise TrainError(
                f"initialize.checkpoint={path}",
                "is neither a run directory with a complete checkpoint, a checkpoint directory, nor a "
                "scConcept model directory.",
                "Point it at PATH.CHECKPOINT_ROOT/<run_id>, .../checkpoints/step_<N> or a scConcept model directory.",
            )
        if not (init.create_new_run or init.fresh_training):
            raise TrainError(
                "initialize.checkpoint",
                "loads weights only into a NEW run.",
                "Add initialize.create_new_run=True (weights only) or initialize.fresh_training=True "
                "(weights and optimizer state), or resume the run with initialize.resume=True.",
            )
        return weights_from

    def _new_run(self, root: Path, run_id: str | None) -> str:
        """A new run's id (initialize.run_id, else the start time), whose folder holds no run yet."""
        if not run_id:
            run_id = _broadcast(datetime.now(UTC).strftime("%Y%m%d-%H%M%S"), self.d)
        if latest_checkpoint(root / run_id) is not None:
            raise TrainError(
                root / run_id,
                "already holds a run with checkpoints.",
                "Resume it with initialize.resume=True (or auto), or choose another initialize.run_id.",
            )
        return run_id

    def _build_model(self) -> ContrastiveModel:
        vocab_sizes = {sp: self.data.catalog.vocab(sp).size for sp in self.data.species}
        pretrained_dir = self.cfg.PATH.PRETRAINED_VOCABULARY
        mcfg = ModelConfig.from_run_config(self.cfg, vocab_sizes)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        model = ContrastiveModel(mcfg)
        if self.scconcept is not None:
            from ..scconcept import continued

            continued.load_into(model, self.scconcept, self.weights_from)
        if pretrained_dir and self.resume_from is None and self.weights_from is None:  # else the checkpoint has them
            try:
                for sp in self.data.species:
                    weight = read_gene_vectors(
                        Path(pretrained_dir) / f"{sp}.csv",
                        self.data.catalog.vocab(sp).gene_id_of_token,
                        mcfg.dim_pretrained_vocab,
                        warn=self.log,
                    )
                    model.set_gene_vectors(sp, torch.from_numpy(weight))
            except FileNotFoundError as exc:
                raise TrainError(
                    "PATH.PRETRAINED_VOCABULARY",
                    f"is {pretrained_dir}, which has no {Path(exc.filename).name}.",
                    "Point it at a directory of <species>.csv gene vectors, make co-expression vectors "
                    f"with `concept-shard gene-vectors {self.cfg.PATH.PROJECT_PATH}`, or set it to null.",
                ) from None
            except GeneVectorWidthError as exc:
                raise TrainError(
                    "model.dim_pretrained_vocab",
                    f"does not fit the gene vectors ({exc}).",
                    "Set model.dim_pretrained_vocab to the vectors' length.",
                ) from None
            except ValueError as exc:  # pandas: not a CSV of floats
                raise TrainError(
                    "PATH.PRETRAINED_VOCABULARY",
                    f"holds a file that cannot be read as gene vectors ({exc}).",
                    "Each <species>.csv needs a header, then rows of a gene id and model.dim_pretrained_vocab floats.",
                ) from None
        freeze = self.training.freeze_pretrained_vocabulary
        vocab_only = self.training.train_vocab_only
        model.set_trainable(freeze_pretrained=freeze, vocab_only=vocab_only)
        if freeze and not mcfg.pretrained:
            self.log(
                "[train] model.training.freeze_pretrained_vocabulary has no effect: PATH.PRETRAINED_VOCABULARY "
                "is not set (the gene tables are learnt)"
            )
        if vocab_only:
            self.log("[train] model.training.train_vocab_only: only the learnable gene tables are trained")
        model.to(self.d.device)
        return apply_fsdp(model, self.d, compile_blocks=self.training.compile)

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.d.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward_views(self, batch, mlm: bool = False):
        """Both views of `batch` through the model: (z1, z2, (per-token outputs, MLM mask or None,
        the unmasked values, logit log-scale)). `mlm`: mask values (`model.training.masking_rate`).
        In train mode the learnable gene residual follows the step's schedule; in eval mode
        (validation) it is always added (unless never: use_learnable_embs_freq null)."""
        b = batch.to(self.d.device)
        species = self.data.species[int(batch.species[0])] if batch.n_cells else self.data.species[0]
        values, mlm_mask = b.values, None
        if mlm:
            mlm_mask = self._mlm_mask(batch).to(b.tokens.device)
            values = torch.where(
                mlm_mask, torch.tensor(self.mask_value, dtype=values.dtype, device=values.device), values
            )
        # None when the run never adds the residual: the tables stay out of the graph (no gradient,
        # no optimizer state), so a run without them computes exactly what it did before they existed
        add = (
            None
            if self.residual_freq is None
            else adds_learnable_embs(self.residual_freq, self.step if self.model.training else None)
        )
        with self._autocast():
            z, hidden, scale = self.model(
                b.tokens, values, b.positions, b.cu_seqlens, b.max_seqlen, species, add_learnable=add
            )
        n = batch.n_cells
        return z[:n], z[n:], (hidden, mlm_mask, b.values, scale)

    def _mlm_mask(self, batch) -> torch.Tensor:
        """Which tokens of this rank's part of `batch` get their value masked: each gene token (never
        `<cls>`) with probability masking_rate, from a generator seeded with (seed, batch index,
        rank), so a resumed run masks the same values."""
        rng = np.random.default_rng([self.cfg.seed, MLM_STREAM, int(batch.index), self.d.rank])
        draw = torch.from_numpy(rng.random(batch.tokens.shape[0]) < self.masking_rate)
        return draw.to(batch.tokens.device) & (batch.tokens != CLS_TOKEN)

    def _mlm_loss(self, batch, hidden, mlm_mask, values) -> torch.Tensor:
        """The reference's MLM loss: per view, the mean squared error of the decoder's values at the
        masked tokens, summed over the two views. Tokens of masked items (`items_mask`) are left out.
        The decoder runs on every rank every step, on no rows if need be: FSDP reduces its gradient
        on all ranks together."""
        n = batch.n_cells
        lengths = torch.diff(batch.cu_seqlens.to(torch.int64)).to(hidden.device)
        seq = torch.repeat_interleave(torch.arange(2 * n, device=hidden.device), lengths)
        keep = mlm_mask & batch.items_mask.to(hidden.device).repeat(2)[seq]
        pred = self.model.predict_values(hidden[keep].float()).float()
        err = (pred - values[keep].float()) ** 2
        view2 = seq[keep] >= n
        loss = pred.sum() * 0.0
        for in_view in (~view2, view2):
            loss = loss + err[in_view].sum() / in_view.sum().clamp(min=1)
        return loss

    def _batch_digest(self, batches) -> str:
        h = hashlib.blake2b(digest_size=8)
        plan = self.train_loader.plan
        for batch in batches:
            pb = plan.batch(batch.index)
            h.update(("|".join(plan.sets[int(i)].dataset_id for i in pb.datasets)).encode())
            h.update(np.ascontiguousarray(pb.rows, np.int64).tobytes())
        return h.hexdigest()

    def _sum(self, value: float) -> float:
        if self.d.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.d.device)
        dist.all_reduce(t)
        return float(t)

    def _flops_per_step(self, batches) -> float:
        """6 N per real token + attention 12 L d per token pair within a sequence (real tokens only)."""
        c = self.model_cfg
        if self._dense_params is None:  # embedding lookups are not matmuls: left out of N
            self._dense_params = sum(p.numel() for name, p in self.model.named_parameters() if "embeddings" not in name)
        n_params = self._dense_params
        flops = 0.0
        for batch in batches:
            lengths = torch.diff(batch.cu_seqlens.to(torch.int64)).double()
            flops += 6 * n_params * float(lengths.sum()) + 12 * c.nlayers * c.dim_model * float((lengths**2).sum())
        return flops

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg

    def train_step(self, it) -> dict:
        acc = self.training.accumulate_grad_batches
        masking = self.masking_rate > 0
        cont_w = self.cfg.model.cont_loss_weight
        t0 = time.perf_counter()
        batches, losses, mlm_losses, r1, r5, tokens, cells = [], [], [], [], [], 0, 0
        for _ in range(acc):
            batch = next(it)
            batches.append(batch)
            # masking_rate > 0 masks values also without an MLM loss (the reference does: input noise)
            z1, z2, (hidden, mask, values, scale) = self.forward_views(batch, mlm=masking)
            scale_value = float(scale.detach())  # before backward: FSDP2 frees the whole parameter after it
            loss, m = self.objective(z1, z2, scale, batch.items_mask.to(z1.device), self.step, key=batch.index)
            loss = cont_w * loss
            if self.mlm:
                loss_mlm = self._mlm_loss(batch, hidden, mask, values)
                mlm_losses.append(float(loss_mlm.detach()))
                loss = loss + self.mlm_weight * loss_mlm
            (loss / acc).backward()
            losses.append(float(loss.detach()))
            r1.append(m["recall@1"])
            r5.append(m["recall@5"])
            tokens += int(batch.tokens.numel())
            cells += batch.n_cells
        grad_norm = self._grad_norm()
        loss_value = sum(losses) / len(losses)
        # a step with a non-finite loss or gradient on any rank is not applied (the norm is global)
        finite = np.isfinite(self._sum(loss_value)) and np.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.nonfinite_steps = 0
        else:
            self.nonfinite_steps += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens, cells = self._sum(tokens), self._sum(cells)
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": batches[-1].epoch,
            "loss": loss_value,
            "lr": lr,
            "recall@1": float(np.mean(r1)),
            "recall@5": float(np.mean(r5)),
            "logit_scale": scale_value,
            "grad_norm": grad_norm,
            "cells_per_s": cells / dt,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "batch_digest": self._batch_digest(batches),
            "batches_seen": self.train_loader.position,
        }
        if self.mlm:
            row["loss_mlm"] = sum(mlm_losses) / len(mlm_losses)
        if not finite:
            row["skipped"] = "non-finite loss or gradients"
        if self.d.device.type == "cuda":
            flops = self._sum(self._flops_per_step(batches))
            row["mfu"] = flops / dt / (H100_BF16_PEAK_FLOPS * self.d.world_size)
        return row

    def _grad_norm(self) -> float:
        """The global gradient norm, the gradients clipped to model.training.gradient_clip_val when set."""
        clip = self.training.gradient_clip_val
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _check_diverged(self) -> None:
        """Stop the run once model.training.max_nonfinite_steps steps in a row were not applied."""
        limit = self.training.max_nonfinite_steps
        if self.nonfinite_steps < limit:
            return
        first_bad = self.step - self.nonfinite_steps + 1
        latest = latest_checkpoint(self.run_dir)
        kept = f"its last checkpoint, {latest.name}, is kept" if latest else "it has no checkpoint"
        raise TrainError(
            "model.training.max_nonfinite_steps",
            f"run {self.run_id} diverged: steps {first_bad}-{self.step} had a non-finite loss or gradients "
            f"({limit} in a row; none was applied, and no checkpoint was written after them); {kept}.",
            "Lower model.training.lr, lengthen model.training.warmup or set model.training.gradient_clip_val, "
            "then resume (initialize.resume=True) or start again.",
        )

    def _check_weights_finite(self) -> None:
        """A checkpoint of non-finite weights is never written (it would rotate good ones away)."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(_local(p)).all()]
        if self._sum(float(len(bad))) > 0:
            raise TrainError(
                f"run {self.run_id} at step {self.step}",
                f"has non-finite weights (e.g. {bad[:3] or 'on another rank'}); no checkpoint was written.",
                "Resume from the last checkpoint (initialize.resume=True) with a lower model.training.lr.",
            )

    # ---- the run ------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        self._check_weights_finite()
        state = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "run_id": self.run_id,
            "best": self.best,
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.d,
            keep_last=self.training.keep_last_checkpoints,
            run_config=self.cfg,
            resumed_from=self.resume_from,
            keep_also=self.best["checkpoint"] if self.best else None,
        )

    def run_validation(self) -> bool:
        """Validate, log the row; True when it is the best so far by model.training.keep_best."""
        row = validate(self.model, self.val_loaders, self.forward_views, self.data.obs_keys, self.objective, self.step)
        self.metrics.write({"kind": "val", "step": self.step, **row})
        return self._is_best(row)

    def _is_best(self, row: dict) -> bool:
        """model.training.keep_best: whether this validation row holds the metric's best value so far
        (lowest for a metric named *loss, else highest; the first of equal ones); if so, `best`
        records it for the checkpoint about to be written."""
        metric = self.training.keep_best
        if not metric:
            return False
        value = row.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            if not self._best_missing_said:
                self._best_missing_said = True
                known = sorted(k for k, v in row.items() if isinstance(v, (int, float)))
                self.log(
                    f"[train] WARNING: model.training.keep_best={metric} is not a finite value of the validation "
                    f"rows (they have: {', '.join(known)}); no best checkpoint is kept"
                )
            return False
        lower = metric.endswith("loss")
        if self.best is not None and not (value < self.best["value"] if lower else value > self.best["value"]):
            return False
        self.best = {"metric": metric, "value": float(value), "step": self.step, "checkpoint": f"step_{self.step}"}
        return True

    def fit(self) -> dict:
        try:
            result = self._fit()
        except BaseException as exc:
            if self.lineage is not None:
                self.lineage.close(failed=True)
            named = self._worker_death(exc)
            if named is not None:
                raise named from None
            raise
        finally:
            self.run_lock.release()
        if self.lineage is not None:
            self.lineage.add_outputs(result["checkpoint"])
            self.lineage.close()
        return result

    def _worker_death(self, exc: BaseException) -> UserError | None:
        """A DataLoader worker that died (killed by a signal: most often the out-of-memory killer),
        as a named error instead of torch's traceback, which it raises wherever the main process is
        at that moment: the step under way may be half done, so nothing is saved; the run resumes
        from its last checkpoint."""
        text = str(exc)
        if not (isinstance(exc, RuntimeError) and "DataLoader worker (pid" in text):
            return None
        last = latest_checkpoint(self.run_dir)
        if last is not None:
            how = (
                f"Continue the run from its last checkpoint, {last.name}, with the same batches: the same command "
                f"with initialize.resume=True initialize.run_id={self.run_id} (without initialize.create_new_run "
                "or initialize.fresh_training)."
            )
        else:
            how = f"Run {self.run_id} has no checkpoint yet: run the command again."
        return DataError(
            "datamodule.dataloader.*.num_workers",
            f"{text.strip().splitlines()[0]} The worker died in step {self.step + 1} of run {self.run_id} (a "
            "worker killed by a signal is most often the out-of-memory killer); that step was not completed "
            "and nothing was saved after the last checkpoint.",
            f"{how} If memory is short, lower the loaders' num_workers or the batch size.",
        )

    def _fit(self) -> dict:
        t = self.training
        max_steps = t.max_steps
        log_every = t.log_every_n_steps
        val_every = validation_steps(t.val_check_interval, self._steps_per_epoch())
        ckpt_every = t.checkpoint_every_n_steps or 0
        if t.validate_before_training and self.step == 0 and self.val_loaders:
            self.run_validation()  # (the untrained model is never kept as the best)
            self.best = None
        profiler = self._profiler()
        it = iter(self.train_loader)
        last_ckpt = None
        self.model.train()
        with profiler or nullcontext(), StopSignals() as signals:
            stopped = signals.agreed(self.d)  # received while the run started up
            while self.step < max_steps and stopped is None:
                row = self.train_step(it)
                if profiler is not None:
                    profiler.step()
                if self.step % log_every == 0 or self.step == max_steps or "skipped" in row:
                    self.metrics.write(row)
                if self.nonfinite_steps:  # no validation or checkpoint in a run that may be diverging
                    self._check_diverged()
                else:
                    best = False
                    if self.val_loaders and (val_every and self.step % val_every == 0 or self._epoch_ended()):
                        best = self.run_validation()
                    if best or ckpt_every and self.step % ckpt_every == 0:
                        last_ckpt = self.checkpoint()
                    if best and self.d.is_main:
                        mark_best(last_ckpt)
                        value = self.best["value"]
                        self.log(f"[train] best {t.keep_best}={value:.4g}: checkpoints/best -> {last_ckpt.name}")
                stopped = signals.agreed(self.d)
            if stopped is not None:
                self.log(f"[train] {stopped} received: stopping after step {self.step} with a checkpoint")
            # still under the handlers: a signal now (after the last step) must not kill the write
            if last_ckpt is None or not last_ckpt.name.endswith(f"_{self.step}"):
                last_ckpt = self.checkpoint()
            curves = (
                plot_curves(
                    self.run_dir / "metrics.jsonl",
                    self.run_dir / "curves.png",
                    batch_size=self.cfg.datamodule.dataloader.train.batch_size,
                )
                if self.d.is_main
                else None
            )
            self.metrics.close()
        return {
            "run_dir": self.run_dir,
            "checkpoint": last_ckpt,
            "curves": curves,
            "step": self.step,
            "stopped": stopped,
        }

    def _steps_per_epoch(self) -> int:
        return max(1, self.train_loader.plan.batches_per_epoch // self.training.accumulate_grad_batches)

    def _epoch_ended(self) -> bool:
        """`check_val_every_n_epoch` (Lightning's sense): whether this step consumed the last batch of
        an epoch e with (e + 1) % N == 0 (epochs of the training loader, counted from 0)."""
        every = self.val_every_epochs
        if not every:
            return False
        per_epoch = self.train_loader.plan.batches_per_epoch
        last = self.train_loader.position - 1  # g of this step's last batch
        first = last - self.training.accumulate_grad_batches + 1
        # epochs whose last batch, g = (e + 1) * per_epoch - 1, lies in [first, last]
        return any((e + 1) % every == 0 for e in range(first // per_epoch, (last + 1) // per_epoch))

    def _profiler(self):
        if not self.cfg.profiler.enabled:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.d.device.type == "cuda" else [])
        out = self.run_dir / "profiler"
        self.log(f"[train] profiling steps 2-4 into {out}")
        return profile(
            activities=activities,
            schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(out), worker_name=f"rank{self.d.rank}"),
        )


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (FSDP2 shards each into a DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def run_training(cfg: Root, log=print) -> dict:
    """One training run from a composed config, as `concept-train` and `train()` run it: build the
    trainer, fit, and free the process group whatever happens. Returns `Trainer.fit()`'s result
    with `run_id` and `is_main`.

    Nothing of the run may hold the default process group when shutdown() frees it (see
    distributed.shutdown): the trainer lives only in `_fit_once`'s frame, and a user error is
    re-raised without its traceback, whose frames would hold the trainer."""
    error = None
    try:
        return _fit_once(cfg, log)
    except UserError as exc:  # printed as a paragraph: neither its traceback nor its chain is shown
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        error = exc
    finally:
        shutdown()
    raise error


def _fit_once(cfg: Root, log) -> dict:
    trainer = Trainer(cfg, log=log)
    result = trainer.fit()
    return dict(result, run_id=trainer.run_id, is_main=trainer.d.is_main)
