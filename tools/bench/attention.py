#!/usr/bin/env python
"""Packed attention alone, forward + backward, on the view lengths of real batches (not a test).

Usage::

    python tools/bench/attention.py PROJECT_PATH [--device cpu|cuda] [--batches N] [key=value ...]

Draws `--batches` training batches per case (`realistic`, `full`: see tools/bench/model.py) through
the real loader at the 30M model's shape (8 heads of 64, global batch 128 on CUDA, 32 on CPU),
then times each attention path on random q, k, v of those lengths: the model's own backends
(`varlen`: PyTorch's native varlen_attn, CUDA; `flash`: flash-attn, when installed; `grouped`:
the CPU path) and, on CUDA, SDPA over a nested (jagged) tensor with each SDPA backend.
Each path's output is compared with the first path's (max |diff| printed). TFLOP/s counts 4 x head_dim x len^2 per head
for the forward and 2.5 times that for the backward, real tokens only.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
HEADS, HEAD_DIM = 8, 64


def load_model_bench():
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).with_name("model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module
    spec.loader.exec_module(module)
    return module


def paths(cu: torch.Tensor, max_len: int) -> dict:
    from concept_train.model.attention import HAS_FLASH_ATTN, varlen_attention

    out = {}
    if cu.is_cuda:
        out["varlen"] = lambda q, k, v: varlen_attention(q, k, v, cu, max_len, backend="varlen")
        if HAS_FLASH_ATTN:
            out["flash"] = lambda q, k, v: varlen_attention(q, k, v, cu, max_len, backend="flash")
    out["grouped"] = lambda q, k, v: varlen_attention(q, k, v, cu, max_len, backend="grouped")

    def nested(backend):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v):
            q, k, v = (
                torch.nested.nested_tensor_from_jagged(x, offsets=cu.long(), max_seqlen=max_len).transpose(1, 2)
                for x in (q, k, v)
            )
            with sdpa_kernel(getattr(SDPBackend, backend)):
                o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).values()

        return run

    for backend in ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"] if cu.is_cuda else []:
        out[f"nested_{backend.split('_')[0].lower()}"] = nested(backend)
    return out


def time_path(fn, q, k, v, grad, repeats: int) -> float:
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)

    def call():
        q.grad = k.grad = v.grad = None  # no accumulation kernels in the timing
        fn(q, k, v).backward(grad)

    for _ in range(2):
        call()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("project_path")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per path (default 8 on CUDA, 2 on CPU)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unexpected arguments {bad}: overrides are key=value")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("attention.py: --device cuda but torch sees no CUDA device here")
    bench = load_model_bench()
    device, dtype = torch.device(args.device), (torch.bfloat16 if cuda else torch.float32)
    repeats = args.repeats or (8 if cuda else 2)
    extra = [f"datamodule.dataloader.train.batch_size={128 if cuda else 32}"] + overrides
    root = Path(tempfile.mkdtemp(prefix="bench_attention_"))
    try:
        for case, case_overrides in (("realistic", bench.CASES["realistic"]), ("full", bench.CASES["full"])):
            trainer = bench.build_trainer(
                args.project_path, ["model=ContrastiveModelTiny"] + case_overrides + extra, root, case, "cpu", "fp32"
            )  # the loader only
            it = iter(trainer.train_loader)
            for _ in range(args.batches):
                cu = next(it).cu_seqlens.to(device=device, dtype=torch.int32)
                lengths = torch.diff(cu.long()).double()
                T, max_len = int(cu[-1]), int(lengths.max())
                flops = 3.5 * 4 * HEADS * HEAD_DIM * float((lengths**2).sum())
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (
                    torch.randn(T, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g).requires_grad_()
                    for _ in range(3)
                )
                grad = torch.randn(T, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
                reference = None
                for name, fn in paths(cu, max_len).items():
                    try:
                        out = fn(q, k, v).detach().float()
                        diff = 0.0 if reference is None else float((out - reference).abs().max())
                        dt = time_path(fn, q, k, v, grad, repeats)
                        reference = out if reference is None else reference  # a path that ran both ways
                        print(
                            f"{case:9s} {T:>8,} tokens, median view {int(lengths.median()):>4}: {name:16s} "
                            f"{dt * 1e3:8.2f} ms  {flops / dt / 1e12:7.2f} TFLOP/s  max |diff| {diff:.2g}",
                            flush=True,
                        )
                    except Exception as err:  # a backend this torch / device lacks: say so, go on
                        print(
                            f"{case:9s} {name:16s} not available: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
                            flush=True,
                        )
            del trainer
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
