"""The training loop, written out (no Lightning): one process, torchrun or srun; FSDP2 when there
is more than one process.

Per optimizer step: `accumulate_grad_batches` global batches -> both views in one forward pass ->
InfoNCE over the global batch -> backward -> clip -> AdamW -> schedule. Every
`log_every_n_steps` a metrics row, every `val_check_interval` validation, every
`checkpoint_every_n_steps` (and at the end) a checkpoint. Resuming restores model, optimizer,
scheduler, step, RNG and the loader's position, so the batch sequence and (on CPU) the losses
continue exactly as if the run had not stopped.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from concept_shard.errors import TrainError, UserError
from concept_shard.gene_vectors import GeneVectorWidthError, read_gene_vectors
from concept_shard.splits import check_plain_name

from ..data import DataModule
from ..model import ContrastiveModel, ContrastiveObjective, ModelConfig
from .checkpoint import (checkpoint_step, config_changes, intact_checkpoint, latest_checkpoint, load_checkpoint,
                         resolve_checkpoint, save_checkpoint)
from .distributed import Dist, apply_fsdp, init_distributed, shutdown
from .metrics import MetricsLog, plot_curves
from .optim import build_optimizer, lr_lambda
from .validate import validate

H100_BF16_PEAK_FLOPS = 989e12
MLM_MASK_PROB = 0.15


def _broadcast(obj, d: Dist):
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    def __init__(self, cfg: DictConfig, log=print):
        self.cfg, self.d = cfg, init_distributed()
        self.log = log if self.d.is_main else (lambda *a, **k: None)
        self.training = cfg.model.training
        try:
            self.objective = ContrastiveObjective.from_config(cfg.model)
        except ValueError as err:
            raise TrainError("model.contrastive_loss", f"{err}.", "Use model.contrastive_loss=multiclass.") from None
        self.run_id, self.run_dir, self.resume_from, self.weights_from = self._resolve_run()
        if self.resume_from is not None:
            changed = config_changes(self.resume_from, cfg)
            if changed:
                self.log(f"[train] resuming with {len(changed)} key(s) changed since the checkpoint: "
                         + ", ".join(changed))
        if self.d.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            # the run's config stays as it started; a resume records its own (overrides may differ)
            name = f"config.resume_step{checkpoint_step(self.resume_from)}.yaml" if self.resume_from is not None \
                else "config.yaml"
            OmegaConf.save(cfg, self.run_dir / name, resolve=True)
        self.d.barrier()
        how = f"{self.d.world_size} processes, FSDP2 over {'nccl' if self.d.device.type == 'cuda' else 'gloo'}" \
            if self.d.world_size > 1 else "1 process"
        self.log(f"[train] run {self.run_id} in {self.run_dir}: {how}, device {self.d.device.type}")
        self.data = DataModule(cfg, rank=self.d.rank, world_size=self.d.world_size, log=self.log)
        self.train_loader = self.data.train_loader()
        self.val_loaders = self.data.val_loaders()
        try:      # config values the model and the optimizer reject (ValueError names the key)
            self.model = self._build_model()
            self.optimizer = build_optimizer(self.model, self.training)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.training))
        except ValueError as err:
            key, _, problem = str(err).partition(": ")
            if not re.fullmatch(r"(model|datamodule|PATH)\.[\w.]+(=.*)?", key):   # torch's own words, no key
                key, problem = "model", str(err)
            raise TrainError(key, f"is not valid ({problem}).", "Fix it in the config or override it.") from None
        self.step = 0
        self._dense_params: int | None = None
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.d)
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.train_loader.load_state_dict(state["loader"])
            self.log(f"[train] resumed run {self.run_id} from {self.resume_from} (step {self.step})")
        elif self.weights_from is not None:
            load_checkpoint(self.weights_from, self.model, self.optimizer, self.d, weights_only=True)
            self.log(f"[train] new run {self.run_id} starts from the weights of {self.weights_from}")
        self.metrics = MetricsLog(self.run_dir, cfg, self.d.is_main, self.run_id, log=self.log)
        self.lineage = None
        if self.d.is_main and OmegaConf.select(cfg, "lamindb.enabled"):
            from .lineage import TrainLineage
            self.lineage = TrainLineage(cfg, self.run_id, self.run_dir, self.resume_from)
            self.lineage.add_inputs(self.data.catalog.all_sets())

    # ---- set-up -----------------------------------------------------------------------------
    def _resolve_run(self):
        init = self.cfg.initialize
        root = Path(self.cfg.PATH.CHECKPOINT_ROOT)
        run_id = init.get("run_id")
        if run_id:       # a folder under PATH.CHECKPOINT_ROOT, never a path out of it
            run_id = check_plain_name(run_id, "initialize.run_id", TrainError)
        resume_from = weights_from = None
        if init.get("resume"):
            if not run_id:
                raise TrainError("initialize.resume", "is true but initialize.run_id is not set.",
                                 "Pass initialize.run_id=<the run's id> (its folder under PATH.CHECKPOINT_ROOT).")
            # rank 0 checks the checksums and picks; every rank resumes from the same checkpoint
            resume_from = _broadcast(intact_checkpoint(root / str(run_id), self.log) if self.d.is_main else None,
                                     self.d)
            if resume_from is None:
                if (root / str(run_id)).exists():       # starting it anew would overwrite what is there
                    raise TrainError(root / str(run_id), "has no complete checkpoint to resume from (none whose "
                                     "files match their checksums).",
                                     "Check initialize.run_id; to train from scratch, start a new run with another "
                                     "initialize.run_id (this one's directory is kept as it is).")
                raise TrainError(root / str(run_id), "has no complete checkpoint to resume from: there is no such run.",
                                 "Check initialize.run_id and PATH.CHECKPOINT_ROOT, or start a new run without "
                                 "initialize.resume.")
        else:
            if init.get("checkpoint"):
                path = Path(str(init.checkpoint))
                weights_from = resolve_checkpoint(path)
                if weights_from is None:
                    raise TrainError(f"initialize.checkpoint={path}", "is neither a run directory with a "
                                     "complete checkpoint nor a checkpoint directory.",
                                     "Point it at PATH.CHECKPOINT_ROOT/<run_id> or .../checkpoints/step_<N>.")
                if not init.get("create_new_run"):
                    raise TrainError("initialize.checkpoint", "loads weights only into a NEW run.",
                                     "Add initialize.create_new_run=True (or resume the run with initialize.resume=True).")
            if not run_id:
                run_id = _broadcast(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), self.d)
            if latest_checkpoint(root / str(run_id)) is not None:
                raise TrainError(root / str(run_id), "already holds a run with checkpoints.",
                                 "Resume it with initialize.resume=True, or choose another initialize.run_id.")
        return str(run_id), root / str(run_id), resume_from, weights_from

    def _build_model(self) -> ContrastiveModel:
        vocab_sizes = {sp: self.data.catalog.vocab(sp).size for sp in self.data.species}
        pretrained_dir = self.cfg.PATH.get("PRETRAINED_VOCABULARY")
        mcfg = ModelConfig.from_run_config(self.cfg, vocab_sizes)
        torch.manual_seed(int(self.cfg.get("seed", 0)))      # identical initial weights on every rank
        model = ContrastiveModel(mcfg)
        if pretrained_dir and self.resume_from is None and self.weights_from is None:    # else the checkpoint has them
            try:
                for sp in self.data.species:
                    weight = read_gene_vectors(Path(pretrained_dir) / f"{sp}.csv",
                                               self.data.catalog.vocab(sp).gene_id_of_token,
                                               mcfg.dim_pretrained_vocab, warn=self.log)
                    model.set_gene_vectors(sp, torch.from_numpy(weight))
            except FileNotFoundError as exc:
                raise TrainError("PATH.PRETRAINED_VOCABULARY", f"is {pretrained_dir}, which has no {Path(exc.filename).name}.",
                                 "Point it at a directory of <species>.csv gene vectors, make co-expression vectors "
                                 f"with `concept-shard gene-vectors {self.cfg.PATH.PROJECT_PATH}`, or set it to null.") from None
            except GeneVectorWidthError as exc:
                raise TrainError("model.dim_pretrained_vocab", f"does not fit the gene vectors ({exc}).",
                                 "Set model.dim_pretrained_vocab to the vectors' length.") from None
            except ValueError as exc:         # pandas: not a CSV of floats
                raise TrainError("PATH.PRETRAINED_VOCABULARY", f"holds a file that cannot be read as gene vectors ({exc}).",
                                 "Each <species>.csv needs a header, then rows of a gene id and "
                                 "model.dim_pretrained_vocab floats.") from None
        model.to(self.d.device)
        return apply_fsdp(model, self.d, compile_blocks=bool(self.training.get("compile", False)))

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.d.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward_views(self, batch, mlm: bool = False):
        b = batch.to(self.d.device)
        species = self.data.species[int(batch.species[0])] if batch.n_cells else self.data.species[0]
        mlm_mask = None
        if mlm:
            mlm_mask = (torch.rand(b.tokens.shape, device=b.tokens.device) < MLM_MASK_PROB) & (b.tokens != 0)
        with self._autocast():
            z, hidden, scale = self.model(b.tokens, b.values, b.positions, b.cu_seqlens, b.max_seqlen, species, mlm_mask)
        n = batch.n_cells
        return z[:n], z[n:], (hidden, mlm_mask, b.values, scale)

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
        if self._dense_params is None:      # embedding lookups are not matmuls: left out of N
            self._dense_params = sum(p.numel() for name, p in self.model.named_parameters()
                                     if "gene_embeddings" not in name)
        n_params = self._dense_params
        flops = 0.0
        for batch in batches:
            lengths = torch.diff(batch.cu_seqlens.to(torch.int64)).double()
            flops += 6 * n_params * float(lengths.sum()) + 12 * c.nlayers * c.dim_model * float((lengths ** 2).sum())
        return flops

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg

    def train_step(self, it) -> dict:
        acc = int(self.training.get("accumulate_grad_batches", 1))
        mlm_w = float(self.cfg.model.get("mlm_loss_weight", 0.0))
        mlm = mlm_w > 0 and self.cfg.model.get("input_encoding") == "value_encoding"
        cont_w = float(self.cfg.model.get("cont_loss_weight", 1.0))
        t0 = time.perf_counter()
        batches, losses, r1, r5, tokens, cells = [], [], [], [], 0, 0
        for _ in range(acc):
            batch = next(it)
            batches.append(batch)
            z1, z2, (hidden, mask, values, scale) = self.forward_views(batch, mlm=mlm)
            scale_value = float(scale.detach())   # before backward: FSDP2 frees the whole parameter after it
            loss, m = self.objective(z1, z2, scale, batch.items_mask.to(z1.device), self.step)
            loss = cont_w * loss
            if mlm and mask is not None and mask.any():
                pred = self.model.predict_values(hidden[mask].float())
                loss = loss + mlm_w * torch.nn.functional.mse_loss(pred, values[mask].float())
            (loss / acc).backward()
            losses.append(float(loss.detach()))
            r1.append(m["recall@1"])
            r5.append(m["recall@5"])
            tokens += int(batch.tokens.numel())
            cells += batch.n_cells
        clip = self.training.get("gradient_clip_val")
        grad_norm = None
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens, cells = self._sum(tokens), self._sum(cells)
        row = {"kind": "train", "step": self.step, "epoch": batches[-1].epoch, "loss": sum(losses) / len(losses),
               "lr": lr, "recall@1": float(np.mean(r1)), "recall@5": float(np.mean(r5)),
               "logit_scale": scale_value,
               "grad_norm": grad_norm, "cells_per_s": cells / dt, "tokens_per_s": tokens / dt, "step_s": dt,
               "batch_digest": self._batch_digest(batches), "batches_seen": self.train_loader.position}
        if self.d.device.type == "cuda":
            flops = self._sum(self._flops_per_step(batches))
            row["mfu"] = flops / dt / (H100_BF16_PEAK_FLOPS * self.d.world_size)
        return row

    # ---- the run ------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "loader": self.train_loader.state_dict(), "run_id": self.run_id}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.d,
                               keep_last=int(self.training.get("keep_last_checkpoints", 3)), run_config=self.cfg,
                               resumed_from=self.resume_from)

    def run_validation(self) -> None:
        row = validate(self.model, self.val_loaders, self.forward_views, self.data.obs_keys, self.objective, self.step)
        self.metrics.write({"kind": "val", "step": self.step, **row})

    def fit(self) -> dict:
        try:
            result = self._fit()
        except BaseException:
            if self.lineage is not None:
                self.lineage.close(failed=True)
            raise
        if self.lineage is not None:
            self.lineage.add_outputs(result["checkpoint"])
            self.lineage.close()
        return result

    def _fit(self) -> dict:
        t = self.training
        max_steps = int(t.max_steps)
        log_every = max(1, int(t.get("log_every_n_steps", 100)))
        val_every = int(t.get("val_check_interval") or 0)
        ckpt_every = int(t.get("checkpoint_every_n_steps") or 0)
        if t.get("validate_before_training", True) and self.step == 0 and self.val_loaders:
            self.run_validation()
        profiler = self._profiler()
        it = iter(self.train_loader)
        last_ckpt = None
        self.model.train()
        with profiler or nullcontext():
            while self.step < max_steps:
                row = self.train_step(it)
                if profiler is not None:
                    profiler.step()
                if self.step % log_every == 0 or self.step == max_steps:
                    self.metrics.write(row)
                if val_every and self.step % val_every == 0 and self.val_loaders:
                    self.run_validation()
                if ckpt_every and self.step % ckpt_every == 0:
                    last_ckpt = self.checkpoint()
        if last_ckpt is None or not last_ckpt.name.endswith(f"_{self.step}"):
            last_ckpt = self.checkpoint()
        curves = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png") if self.d.is_main else None
        self.metrics.close()
        return {"run_dir": self.run_dir, "checkpoint": last_ckpt, "curves": curves, "step": self.step}

    def _profiler(self):
        if not self.cfg.get("profiler", {}).get("enabled", False):
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.d.device.type == "cuda" else [])
        out = self.run_dir / "profiler"
        self.log(f"[train] profiling steps 2-4 into {out}")
        return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(out), worker_name=f"rank{self.d.rank}"))


def run_training(cfg: DictConfig, log=print) -> dict:
    """One training run from a composed config, as `concept-train` and `train()` run it: build the
    trainer, fit, and free the process group whatever happens. Returns `Trainer.fit()`'s result
    with `run_id` and `is_main`.

    Nothing of the run may hold the default process group when shutdown() frees it (see
    distributed.shutdown): the trainer lives only in `_fit_once`'s frame, and a user error is
    re-raised without its traceback, whose frames would hold the trainer."""
    error = None
    try:
        return _fit_once(cfg, log)
    except UserError as exc:      # printed as a paragraph: neither its traceback nor its chain is shown
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        error = exc
    finally:
        shutdown()
    raise error


def _fit_once(cfg: DictConfig, log) -> dict:
    trainer = Trainer(cfg, log=log)
    result = trainer.fit()
    return dict(result, run_id=trainer.run_id, is_main=trainer.d.is_main)
