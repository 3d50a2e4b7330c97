"""DataLoader workers are capped at SLURM_CPUS_PER_TASK (else the machine's CPU count), as
scConcept caps them, with one log line saying so."""

from __future__ import annotations

import os

from helpers import ADVANCED

from concept_train.data.deliver.workers import capped_workers


def test_the_cap_is_slurm_cpus_per_task_else_the_cpu_count():
    lines = []
    key = "datamodule.dataloader.train.num_workers"
    assert capped_workers(8, key, lines.append, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert lines == [f"[data] {key}=8 capped at 3 worker(s): SLURM_CPUS_PER_TASK is 3."]
    assert capped_workers(3, key, lines.append, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert capped_workers(0, key, lines.append, {"SLURM_CPUS_PER_TASK": "1"}) == 0
    assert capped_workers(None, key, lines.append, {}) == 0
    assert len(lines) == 1  # nothing said when nothing is capped
    cpus = len(os.sched_getaffinity(0))
    for env in ({}, {"SLURM_CPUS_PER_TASK": ""}, {"SLURM_CPUS_PER_TASK": "lots"}):
        assert capped_workers(cpus + 5, key, lines.append, env) == cpus
        assert (
            lines.pop()
            == f"[data] {key}={cpus + 5} capped at {cpus} worker(s): the number of CPUs this process may use is {cpus}."
        )


def test_the_loaders_of_a_data_module_are_capped(sharded_example, monkeypatch):
    from concept_shard.config import compose_config
    from concept_train.data import DataModule

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    cfg = compose_config(sharded_example, [*ADVANCED, "datamodule.dataloader.train.num_workers=2"])
    val = next(iter(cfg.datamodule.dataloader.val))
    cfg.datamodule.dataloader.val[val].num_workers = 3
    lines = []
    dm = DataModule(cfg, log=lines.append)
    assert dm.train_loader().num_workers == 1
    assert dm.val_loaders()[val].num_workers == 1
    capped = [line for line in lines if "capped" in line]
    assert capped == [
        "[data] datamodule.dataloader.train.num_workers=2 capped at 1 worker(s): SLURM_CPUS_PER_TASK is 1.",
        f"[data] datamodule.dataloader.val.{val}.num_workers=3 capped at 1 worker(s): SLURM_CPUS_PER_TASK is 1.",
    ]
