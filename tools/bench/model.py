#!/usr/bin/env python
"""Training throughput of the packed (varlen) model against a padded SDPA baseline of the same model (not a test).

Usage::

    python tools/bench/model.py PROJECT_PATH [--configs tiny,medium] [--cases realistic,uniform,full]
                                [--device cpu|cuda] [--dtype fp32|bf16] [--batch-size N] [--batches N]
                                [--repeats R] [--threads N] [--compile] [--profile] [key=value ...]
    # on an H100 / H200, the 30M model of conf/model/ContrastiveModel.yaml (dim_model 512, 8 layers, max_tokens 1000,
    # bf16):
    python tools/bench/model.py PROJECT_PATH --device cuda --configs 30m --cases realistic,full [--compile] [--profile]

PROJECT_PATH is the example project, sharded (`python tools/make_example_project.py DIR` then
`concept-shard build DIR --no-progress`); extra `key=value` arguments are config overrides.

For each model config and length case, a real `Trainer` is built from the composed config (its
model, AdamW, schedule, loader) and `--batches` training batches are drawn through its loader, so
view lengths follow the example shards (panels of varying size, capped at `max_tokens`). Both
paths then run `Trainer.train_step` on exactly those batches -- forward of both views, InfoNCE,
backward, gradient clipping, AdamW, schedule -- and differ only in the forward pass:

- packed: the trainer's own `forward_views` (the model's varlen attention: `grouped` on CPU,
  flash-attn / native varlen on CUDA in bf16) on the packed batch, real tokens only;
- padded: the SAME module weights run as a conventional padded transformer: every view padded to
  the batch's longest view ([2B, L_max]; the padded tensors are built before timing, as a padded
  data loader would deliver them), every layer over all B x L_max positions, one dense
  `scaled_dot_product_attention` per layer with a key-padding mask, the CLS output taken at
  position 0 (`padded_forward` below).

First, on one batch in fp32 without dropout, both give the same embeddings, loss and gradients
(max abs differences reported; the run stops if they exceed 1e-4). Then both paths are timed
alternately: a warm-up step per path (on CUDA a pass over every batch), then `--repeats` passes in which the
two paths take turns batch by batch (which goes first alternates). Throughputs come from each
path's median pass; the packed/padded ratio is the median of the per-pass ratios (robust to
load changes on a shared machine). tokens/s counts REAL tokens (both views, CLS
included) for both paths, so padded work is pure overhead; cells/s counts cells (two views each).

Cases: `realistic` = the config as composed (DataModuleBasic: mixed designed/random panels,
max_tokens 1000); `uniform` = random panels of 45% of a file's genes with max_tokens 200, so
almost every view fills max_tokens (fill ~0.998) and padding is nearly absent; `full` = random
panels of 95% of a file's genes, zeros included (`gene_sampling_strategy=top`), at the config's
max_tokens (1000): views are 1000 genes long wherever a file has that many, the 30M configuration
at its full length (the GPU's best case; few real cells have 1000 nonzero genes).

Configs: `tiny` = conf/model/ContrastiveModelTiny.yaml (128 wide, 2 layers); `medium` = 256 wide,
4 layers, 4 heads, dim_hid 512 (the 30M model's dropout 0.1); `30m` = conf/model/ContrastiveModel.yaml
(512 wide, 8 layers, 8 heads, dim_hid 1024). On CPU the default global batch is 32 (2 cores); on
CUDA it is the reference's 128.

FLOPs are the trainer's accounting (`Trainer._flops_per_step`): 6 x dense parameters (embedding
tables left out) per real token + 12 x nlayers x dim_model x sum of squared view lengths
(attention, real tokens only). On CUDA, MFU = those FLOPs/s over the H100's dense bf16 peak
(989 TFLOP/s, `H100_BF16_PEAK_FLOPS` in the trainer); on CPU only the achieved GFLOP/s is shown.

The LAST line is a JSON object: per config and case, tokens/s, cells/s, step time and FLOP rate of
each path, the packed/padded ratio, the fill (real / padded positions), the equivalence check, and
the targets of issue 4 (packed at least as fast everywhere, faster where lengths vary; >= 35% MFU
for the 30M model on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from concept_shard.vocabulary import PAD_TOKEN  # noqa: E402

CONFIGS = {
    "tiny": ["model=ContrastiveModelTiny"],
    "medium": [
        "model.dim_model=256",
        "model.nlayers=4",
        "model.num_head=4",
        "model.dim_hid=512",
        "model.dim_gene_embs=256",
    ],
    "30m": ["model=ContrastiveModel"],
}
CASES = {
    "realistic": [],
    "uniform": [
        "datamodule.dataset.train.max_tokens=200",
        "datamodule.dataset.train.panel_selection=random",
        "datamodule.dataset.train.panel_size_min=0.45",
        "datamodule.dataset.train.panel_size_max=0.45",
    ],
    "full": [
        "datamodule.gene_sampling_strategy=top",
        "datamodule.dataset.train.panel_selection=random",
        "datamodule.dataset.train.panel_size_min=0.95",
        "datamodule.dataset.train.panel_size_max=0.95",
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the padded baseline: the same modules, run over padded [S, L_max, d] tensors ------------------
@dataclass
class Padded:
    tokens: torch.Tensor  # [S * L] (PAD_TOKEN at padding)
    values: torch.Tensor  # [S * L]
    positions: torch.Tensor  # [S * L]
    real: torch.Tensor  # bool [S, L]: True at real tokens
    S: int
    L: int


def pad_batch(batch, device) -> Padded:
    """The packed batch laid out as [S, L_max] with padding, as a padded loader would deliver it."""
    cu = batch.cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    S, L, T = len(lengths), int(lengths.max()), int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(S), lengths)
    flat = seq * L + (torch.arange(T) - cu[:-1][seq])

    def scatter(x, fill):
        out = torch.full((S * L,), fill, dtype=x.dtype)
        out[flat] = x
        return out.to(device)

    real = torch.zeros(S * L, dtype=torch.bool)
    real[flat] = True
    return Padded(
        scatter(batch.tokens, PAD_TOKEN),
        scatter(batch.values, 0.0),
        scatter(batch.positions, 0),
        real.view(S, L).to(device),
        S,
        L,
    )


def padded_attention(attn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """model.Attention's parameters, dense over [S, L, d] with a key-padding mask [S, 1, 1, L]."""
    S, L, dim = x.shape
    H = attn.heads
    q, k, v = attn.qkv(x).view(S, L, 3, H, dim // H).permute(2, 0, 3, 1, 4).unbind(0)  # [S, H, L, dh]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out(o.transpose(1, 2).reshape(S, L, dim))


def padded_block(block, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """model.Block.forward with the packed attention replaced by `padded_attention`."""
    if block.pre:
        x = x + block.drop1(padded_attention(block.attn, block.norm1(x), mask))
        return x + block.drop2(block.ff(block.norm2(x)))
    x = block.norm1(x + block.drop1(padded_attention(block.attn, x, mask)))
    return block.norm2(x + block.drop2(block.ff(x)))


def padded_forward(model, p: Padded, species: str):
    """ContrastiveModel.forward over the padded layout: (embeddings [S, d], hidden [S, L, d], log-scale)."""
    x = model.embed_tokens(p.tokens, p.values, p.positions, species).view(p.S, p.L, -1)
    mask = p.real[:, None, None, :]
    for block in model.blocks:
        x = padded_block(block, x, mask)
    z = x[:, 0]
    if model.projection is not None:
        z = model.projection(z)
    return F.normalize(z.float(), dim=-1), x, model.logit_scale.float().reshape(())


def padded_forward_views(trainer, padded: dict[int, Padded]):
    """A drop-in for Trainer.forward_views that runs the padded baseline (no MLM)."""

    def forward_views(batch, mlm: bool = False):
        if mlm:
            raise SystemExit("the padded baseline does not implement the MLM loss; set model.mlm_loss_weight=0")
        species = trainer.data.species[int(batch.species[0])]
        with trainer._autocast():
            z, hidden, scale = padded_forward(trainer.model, padded[batch.index], species)
        n = batch.n_cells
        return z[:n], z[n:], (hidden, None, None, scale)

    return forward_views


# ---- set-up, check, timing --------------------------------------------------------------------------
def build_trainer(project: str, overrides: list[str], root: Path, run_id: str, device: str, dtype: str):
    from concept_shard.config import compose_config
    from concept_train.trainer.distributed import Dist
    from concept_train.trainer.loop import Trainer

    cfg = compose_config(
        project,
        [
            f"PATH.CHECKPOINT_ROOT={root}",
            f"initialize.run_id={run_id}",
            "model.training.validate_before_training=False",
            "datamodule.dataloader.train.num_workers=0",
        ]
        + overrides,
    )
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    if device == "cpu" and trainer.d.device.type != "cpu":  # a CPU run on a GPU machine
        trainer.d = Dist(device=torch.device("cpu"))
        trainer.model.to("cpu")
    if trainer.d.device.type == "cuda" and dtype == "fp32":
        trainer._autocast = nullcontext  # the trainer autocasts to bf16 on CUDA
    trainer.model.train()
    return trainer


def check_equivalence(trainer, batch, padded: dict[int, Padded]) -> dict:
    """fp32, dropout off: packed and padded give the same embeddings, loss and gradients."""
    from concept_train.model import contrastive_loss

    model = trainer.model
    model.eval()
    saved = trainer._autocast
    trainer._autocast = nullcontext
    packed_fv, padded_fv = trainer.forward_views, padded_forward_views(trainer, padded)
    out, grads = {}, {}
    try:
        for name, fv in (("packed", packed_fv), ("padded", padded_fv)):
            model.zero_grad(set_to_none=True)
            z1, z2, (_, _, _, scale) = fv(batch)
            loss, _ = contrastive_loss(z1, z2, scale, batch.items_mask.to(z1.device))
            loss.backward()
            out[name] = (torch.cat([z1, z2]).detach(), float(loss.detach()))
            grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        trainer._autocast = saved
        model.train()
    dz = float((out["packed"][0] - out["padded"][0]).abs().max())
    dloss = abs(out["packed"][1] - out["padded"][1])
    common = grads["packed"].keys() & grads["padded"].keys()
    dgrad = max(float((grads["packed"][n] - grads["padded"][n]).abs().max()) for n in common)
    gmax = max(float(grads["packed"][n].abs().max()) for n in common)
    return {
        "max_abs_diff_embedding": dz,
        "abs_diff_loss": dloss,
        "max_abs_diff_grad": dgrad,
        "max_abs_grad": gmax,
        "loss": out["packed"][1],
        "same_grad_params": set(grads["packed"]) == set(grads["padded"]),
    }


@torch.no_grad()
def check_bf16(trainer, batch, padded: dict[int, Padded]) -> dict:
    """Under the trainer's bf16 autocast (dropout off): the same embeddings to bf16 precision."""
    from concept_train.model import contrastive_loss

    trainer.model.eval()
    out = {}
    try:
        for name, fv in (("packed", trainer.forward_views), ("padded", padded_forward_views(trainer, padded))):
            z1, z2, (_, _, _, scale) = fv(batch)
            loss, _ = contrastive_loss(z1, z2, scale, batch.items_mask.to(z1.device))
            out[name] = (torch.cat([z1, z2]).float(), float(loss))
    finally:
        trainer.model.train()
    return {
        "max_abs_diff_embedding": round(float((out["packed"][0] - out["padded"][0]).abs().max()), 6),
        "abs_diff_loss": round(abs(out["packed"][1] - out["padded"][1]), 6),
    }


def timed_step(trainer, batch) -> float:
    t0 = time.perf_counter()
    trainer.train_step(iter([batch]))
    if trainer.d.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_case(args, config: str, case: str, root: Path, extra: list[str]) -> dict:
    # compiled only after the equivalence check: that check runs fp32, whose `grouped` attention path
    # recompiles for every distinct view length
    trainer = build_trainer(
        args.project_path,
        CONFIGS[config] + CASES[case] + extra + ["model.training.compile=false"],
        root,
        f"{config}-{case}",
        args.device,
        args.dtype,
    )
    device = trainer.d.device
    mc = trainer.model.cfg
    it = iter(trainer.train_loader)
    batches = [next(it) for _ in range(args.batches)]
    padded = {b.index: pad_batch(b, device) for b in batches}
    batches = [b.to(device) for b in batches]  # both paths start from tensors on the device
    lengths = [torch.diff(b.cu_seqlens.to(torch.int64)) for b in batches]
    real = sum(int(x.sum()) for x in lengths)
    padded_positions = sum(p.S * p.L for p in padded.values())
    cells = sum(b.n_cells for b in batches)
    flops = trainer._flops_per_step(batches)
    backend = mc.attention_backend
    if backend == "auto":
        from concept_train.model.attention import HAS_FLASH_ATTN

        half = device.type == "cuda" and args.dtype == "bf16"
        backend = "flash" if half and HAS_FLASH_ATTN else "varlen" if half else "grouped"
    log(
        f"[{config}/{case}] dim {mc.dim_model}, {mc.nlayers} layers, {mc.num_head} heads, dim_hid {mc.dim_hid}, "
        f"dropout {mc.dropout}; {trainer._dense_params:,} dense params; packed attention backend {backend}"
    )
    log(
        f"[{config}/{case}] {len(batches)} batches of {batches[0].n_cells} cells, max_tokens "
        f"{trainer.train_loader.maker.token_spec.max_tokens}: {real:,} real tokens, {padded_positions:,} padded "
        f"positions (fill {real / padded_positions:.3f}); view length median "
        f"{float(torch.cat(lengths).double().median()):.0f}, max {max(int(x.max()) for x in lengths)}"
    )

    check = check_equivalence(trainer, batches[0], padded)
    log(
        f"[{config}/{case}] packed vs padded (fp32, no dropout): "
        f"embeddings max |diff| {check['max_abs_diff_embedding']:.2e}, "
        f"loss |diff| {check['abs_diff_loss']:.2e}, grads max |diff| {check['max_abs_diff_grad']:.2e} "
        f"(max |grad| {check['max_abs_grad']:.2e})"
    )
    if device.type == "cuda" and args.dtype == "bf16":  # the kernels actually timed: flash / varlen vs SDPA
        check["bf16"] = check_bf16(trainer, batches[0], padded)
        log(
            f"[{config}/{case}] packed vs padded under bf16 autocast: embeddings max |diff| "
            f"{check['bf16']['max_abs_diff_embedding']:.2e}, loss |diff| {check['bf16']['abs_diff_loss']:.2e}"
        )
    tol = 1e-4
    if not (
        check["max_abs_diff_embedding"] < tol
        and check["abs_diff_loss"] < tol
        and check["max_abs_diff_grad"] < tol * max(1.0, check["max_abs_grad"])
        and check["same_grad_params"]
    ):
        raise SystemExit(f"[{config}/{case}] packed and padded paths disagree beyond {tol}: {check}")

    if args.compile:  # as the trainer does with model.training.compile=true; the padded baseline stays eager
        trainer.model.compile_blocks()
    packed_fv, padded_fv = trainer.forward_views, padded_forward_views(trainer, padded)
    paths = {"packed": packed_fv, "padded": padded_fv}
    times = {name: [0.0] * args.repeats for name in paths}
    warm = batches if device.type == "cuda" else batches[:1]  # CUDA: every shape once (allocator, kernels)
    for _name, fv in paths.items():
        trainer.forward_views = fv
        for b in warm:
            timed_step(trainer, b)
    # the two paths take turns batch by batch (who goes first alternates), so a change in the
    # machine's load (2 shared cores here) hits both alike; a pass = every batch once
    for r in range(args.repeats):
        for i, b in enumerate(batches):
            for name in ["packed", "padded"] if (r + i) % 2 == 0 else ["padded", "packed"]:
                trainer.forward_views = paths[name]
                times[name][r] += timed_step(trainer, b)
    trainer.forward_views = packed_fv
    if args.profile:
        profile_steps(trainer, batches[:3], device)
    peak = None
    if device.type == "cuda":
        from concept_train.trainer.loop import H100_BF16_PEAK_FLOPS

        peak = H100_BF16_PEAK_FLOPS
    res = {
        "batches": len(batches),
        "cells_per_batch": batches[0].n_cells,
        "max_tokens": trainer.train_loader.maker.token_spec.max_tokens,
        "real_tokens": real,
        "padded_positions": padded_positions,
        "fill": round(real / padded_positions, 4),
        "attention_backend": backend,
        "dense_params": trainer._dense_params,
        "check": {k: (round(v, 9) if isinstance(v, float) else v) for k, v in check.items()},
    }
    for name in paths:
        dt = statistics.median(times[name])
        res[name] = {
            "tokens_per_s": round(real / dt),
            "cells_per_s": round(cells / dt, 1),
            "step_s": round(dt / len(batches), 4),
            "gflops_per_s": round(flops / dt / 1e9, 2),
            "pass_s_runs": [round(t, 3) for t in times[name]],
        }
        if peak:
            res[name]["mfu"] = round(flops / dt / peak, 4)
    ratios = [pad / pk for pk, pad in zip(times["packed"], times["padded"])]
    res["packed_over_padded"] = round(statistics.median(ratios), 3)
    res["packed_over_padded_runs"] = [round(x, 3) for x in ratios]
    log(
        f"[{config}/{case}] packed {res['packed']['tokens_per_s']:,} tokens/s, "
        f"{res['packed']['cells_per_s']:,} cells/s; "
        f"padded {res['padded']['tokens_per_s']:,} tokens/s, {res['padded']['cells_per_s']:,} cells/s; "
        f"packed/padded {res['packed_over_padded']:.2f}"
        + (f"; MFU packed {res['packed']['mfu']:.1%}, padded {res['padded']['mfu']:.1%}" if peak else "")
    )
    del trainer
    return res


def profile_steps(trainer, batches, device) -> None:
    """torch.profiler over a few packed training steps: the ops that take the most time on the device
    (CPU when there is no GPU), and the CPU time against the device time of the whole steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = sum(timed_step(trainer, b) for b in batches)
    events = prof.key_averages()
    log(
        events.table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25, max_name_column_width=60
        )
    )
    if cuda:
        from torch.autograd import DeviceType  # kernels only: an op's row repeats its kernels' time

        busy = (
            sum(
                e.self_device_time_total
                for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation
            )
            / 1e6
        )
        log(
            f"[profile] {len(batches)} packed steps: {wall:.3f} s wall (under the profiler), "
            f"{busy:.3f} s of kernel time "
            f"on the device ({busy / wall:.0%} busy)"
        )


def machine(device: str) -> str:
    cpu = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {cpu}"
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("project_path")
    p.add_argument(
        "--configs", default=None, help="comma list of tiny, medium, 30m (default tiny,medium on CPU, 30m on CUDA)"
    )
    p.add_argument("--cases", default="realistic,uniform")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 32 on CPU, 128 on CUDA)")
    p.add_argument("--batches", type=int, default=None, help="distinct batches per pass (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (median taken)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's). On a CPU shared with other jobs, 1 gives steadier "
        "figures: a descheduled OpenMP thread stalls every op of a 2-thread process",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the packed path's encoder blocks, as model.training.compile=true does in training",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile 3 packed steps (torch.profiler) and print the ops that take the most time",
    )
    args, overrides = p.parse_known_args(argv)
    if any(o.lstrip("+").startswith("model.training.compile=") for o in overrides):
        p.error("use --compile (the bench compiles after its equivalence check), not model.training.compile")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unexpected arguments {bad}: overrides are key=value")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(
            "model.py: --device cuda but torch sees no CUDA device here; run it on a GPU machine (or use --device cpu)."
        )
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.compile and not (cuda and args.dtype == "bf16"):
        log(
            "model.py: --compile off CUDA bf16 compiles the `grouped` attention path, which recompiles for every "
            "distinct view length: expect minutes of compilation and figures that say little"
        )
    if not cuda and args.dtype != "fp32":
        raise SystemExit("model.py: the trainer autocasts to bf16 on CUDA only; on CPU use --dtype fp32.")
    configs = (args.configs or ("30m" if cuda else "tiny,medium")).split(",")
    cases = args.cases.split(",")
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: {c} is not one of {list(CONFIGS)}")
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: {c} is not one of {list(CASES)}")
    args.batches = args.batches or (20 if cuda else 3)
    batch_size = args.batch_size or (128 if cuda else 32)
    extra = [f"datamodule.dataloader.train.batch_size={batch_size}"] + overrides

    t_start = time.perf_counter()
    log(
        f"model benchmark on {args.project_path}: configs {configs}, cases {cases}, {args.device} {args.dtype}, "
        f"global batch {batch_size}, {args.batches} batches x {args.repeats} repeats, overrides {overrides}"
    )
    log(f"machine: {machine(args.device)}")
    root = Path(tempfile.mkdtemp(prefix="bench_model_"))
    results: dict[str, dict[str, dict]] = {}
    try:
        for config in configs:
            for case in cases:
                results.setdefault(config, {})[case] = run_case(args, config, case, root, extra)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    log("")
    log(
        f"{'config':>7} {'case':>10} {'fill':>6} {'packed tok/s':>13} {'padded tok/s':>13} {'packed cells/s':>15} "
        f"{'padded cells/s':>15} {'packed/padded':>14}" + (f" {'MFU packed':>11}" if cuda else "")
    )
    for config, per in results.items():
        for case, r in per.items():
            log(
                f"{config:>7} {case:>10} {r['fill']:>6.3f} {r['packed']['tokens_per_s']:>13,} "
                f"{r['padded']['tokens_per_s']:>13,} "
                f"{r['packed']['cells_per_s']:>15,.1f} {r['padded']['cells_per_s']:>15,.1f} "
                f"{r['packed_over_padded']:>14.2f}" + (f" {r['packed']['mfu']:>11.1%}" if cuda else "")
            )
    flat = [r for per in results.values() for r in per.values()]
    targets = {
        "packed_at_least_as_fast": all(r["packed_over_padded"] >= 1.0 for r in flat),
        "packed_faster_where_lengths_vary": (
            all(per["realistic"]["packed_over_padded"] > 1.0 for per in results.values() if "realistic" in per)
            if "realistic" in cases
            else None
        ),
        "mfu_30m_ge_35pct": None,
    }
    if cuda and args.dtype == "bf16" and "30m" in results:
        at = results["30m"].get("realistic") or next(iter(results["30m"].values()))  # max_tokens 1000
        targets["mfu_30m_ge_35pct"] = at["packed"]["mfu"] >= 0.35
    log(f"targets: {targets}")
    summary = {
        "results": results,
        "targets_met": targets,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "batches": args.batches,
        "repeats": args.repeats,
        "compile": args.compile,
        "overrides": overrides,
        "benchmark_s": round(time.perf_counter() - t_start, 1),
        "machine": machine(args.device),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
