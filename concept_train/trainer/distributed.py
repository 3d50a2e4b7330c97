"""Process-group set-up for one process, `torchrun`, or `srun` (SLURM variables).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` without
torchrun they are derived from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first host of
SLURM_JOB_NODELIST and a port from the job id. LOCAL_WORLD_SIZE is set for mosaicml-streaming.
Backend: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _first_host(nodelist: str) -> str:
    """`gpu[01-04,07],cpu3` -> `gpu01` (the part of `scontrol show hostnames` we need)."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return "127.0.0.1"
    if not m.group(3):
        return m.group(1)
    first = m.group(3).split(",")[0].split("-")[0]
    return m.group(1) + first


def slurm_environment(env=os.environ) -> dict[str, str]:
    """The torchrun variables derived from SLURM's, for a task launched by `srun` alone."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    ntasks, nnodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1"))
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(ntasks // max(nnodes, 1))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": per_node,
        "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def init_distributed() -> Dist:
    os.environ.update(slurm_environment())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))  # mosaicml-streaming reads it
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def fsdp_mesh(d: Dist):
    """The device mesh FSDP2 shards the model over. On CPU it gets a gloo group of its own: torch's
    DTensor caches keep FSDP's group alive until the process ends, and the default group, which
    carries every other collective (the loss, checkpoints), must be freed by shutdown()."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if d.device.type == "cuda":  # NCCL: destroy_process_group itself stops its threads
        return init_device_mesh("cuda", (d.world_size,))
    return DeviceMesh.from_group(dist.new_group(backend="gloo"), "cpu")


def apply_fsdp(model, d: Dist, compile_blocks: bool = False):
    """Everything distribution and compilation do to the model, in one place and in torchtitan's
    order: compile each encoder block first, then shard with FSDP2 (each block, each species' gene
    tables, the decoder head, then the root) when there is more than one process. On GPU, FSDP2 gathers parameters in
    bf16 and reduces gradients in fp32; one process keeps fp32 weights and autocasts (the
    measured set-up of BENCHMARKS.md "On a GPU"). The model itself knows nothing of this."""
    if compile_blocks:
        model.compile_blocks()
    if d.world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = fsdp_mesh(d)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if d.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    tables = list(model.gene_embeddings.values())
    if model.learnable_embeddings is not None:
        tables += list(model.learnable_embeddings.values())
    for table in tables:  # only the batch's species runs per step
        fully_shard(table, mesh=mesh, mp_policy=mp)
    if model.decoder is not None:  # a unit of its own: the trainer runs it after forward (MLM)
        fully_shard(model.decoder, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shutdown() -> None:
    """Destroy the default process group and free it while Python is still whole.

    gloo's worker threads let go of a finished collective's tensors only after the collective has
    returned, and letting go of a tensor Python owns takes the GIL. A worker that does so while the
    interpreter is exiting aborts the process ("terminate called without an active exception",
    exit -6) after a run that finished. destroy_process_group does not stop gloo's threads; freeing
    the group joins them (torch releases the GIL for that). Call this after dropping the trainer,
    and with it everything that holds the group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
