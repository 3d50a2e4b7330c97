"""A checkpoint that cannot be written (no space, a quota, a file size limit) is a StorageError
naming it; nothing half-written stays, and the checkpoints before it are intact. It was a raw
`inline_container.cc` enforce failure from torch with a `.tmp` directory left behind."""

from __future__ import annotations

import resource
from contextlib import contextmanager

import pytest
import torch

from concept_shard.errors import StorageError
from concept_train.model import ContrastiveModel, ModelConfig
from concept_train.trainer.checkpoint import latest_checkpoint, save_checkpoint
from concept_train.trainer.distributed import Dist


@contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as they fail with ENOSPC on a full disk (Python
    ignores SIGXFSZ); the process's own limit is restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_checkpoint_that_cannot_be_written_is_a_storage_error_and_leaves_nothing(tmp_path):
    model = ContrastiveModel(
        ModelConfig(vocab_sizes={"hsapiens": 3000}, dim_model=32, nlayers=1, num_head=2, dim_hid=64, dim_gene_embs=32)
    )
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, model, optimizer, {"run_id": "r"}, Dist(), keep_last=2)
    before = sorted(p.name for p in first.iterdir())
    with file_size_limit(64 << 10), pytest.raises(StorageError) as err:
        save_checkpoint(run, 2, model, optimizer, {"run_id": "r"}, Dist(), keep_last=2)
    text = " ".join(str(err.value).split())
    assert "step_2" in text and "could not be written" in text and "GB are free there" in text
    assert "initialize.resume=True" in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]  # no step_2(.tmp)
    assert latest_checkpoint(run) == first and sorted(p.name for p in first.iterdir()) == before
