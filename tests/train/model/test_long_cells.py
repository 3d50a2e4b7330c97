"""Cells of 20,000 tokens (scConcept's largest published model reads cells that long): the CPU
attention path is exact against a float64 reference and never holds a full score matrix (a
20,000 x 20,000 one per head would need 1.6 GB in float32); views longer than the rank encoding
tells apart are refused by name (every gene ranked beyond it shared one position, silently)."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import TINY

from concept_train.cli import main as train
from concept_train.model.attention import grouped_attention

LONG = 20_001  # <cls> and 20,000 genes


def _reference(q, k, v, cu, rows: torch.Tensor) -> torch.Tensor:
    """Attention in float64 for the query rows `rows` (each against every key of its sequence)."""
    out = torch.empty(len(rows), *q.shape[1:], dtype=torch.float64)
    starts = cu[:-1].to(torch.int64)
    for i, r in enumerate(rows.tolist()):
        s = int(torch.searchsorted(starts, r, right=True)) - 1
        a, b = int(cu[s]), int(cu[s + 1])
        keys, values = k[a:b].double().transpose(0, 1), v[a:b].double().transpose(0, 1)  # [H, L, D]
        weights = torch.softmax(q[r].double()[:, None, :] @ keys.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
        out[i] = (weights @ values)[:, 0, :]
    return out


def test_attention_over_a_20000_gene_cell_equals_the_float64_reference():
    torch.manual_seed(0)
    lengths = [37, LONG, 5]  # a long cell between short ones
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, 8) for _ in range(3))
    with torch.no_grad():
        got = grouped_attention(q, k, v, cu)
    # every row of the short cells, the long cell's first and last rows and 300 others
    rows = torch.cat([torch.arange(37), torch.tensor([37, 37 + LONG - 1]), 37 + torch.randperm(LONG)[:300]])
    rows = torch.cat([rows, torch.arange(int(cu[-1]) - 5, int(cu[-1]))])
    assert (got[rows].double() - _reference(q, k, v, cu, rows)).abs().max().item() < 1e-5


def test_attention_over_a_20000_gene_cell_holds_no_score_matrix():
    script = (
        "import resource, torch\n"
        "from concept_train.model.attention import grouped_attention\n"
        f"q, k, v = (torch.randn({LONG}, 4, 16) for _ in range(3))\n"
        f"cu = torch.tensor([0, {LONG}], dtype=torch.int32)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.no_grad():\n"
        "    grouped_attention(q, k, v, cu)\n"
        "print('GREW_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    grew = float(proc.stdout.split("GREW_MB")[1])  # four heads' score matrices: 6,400 MB
    assert grew < 500, proc.stdout + proc.stderr


def test_views_longer_than_the_rank_encoding_are_refused_by_name(sharded_project_copy, capsys):
    run = [str(sharded_project_copy), *TINY, "model.pe_max_len=100", "initialize.run_id=short"]
    assert train([*run, "datamodule.dataset.train.max_tokens=150"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "datamodule.dataset.train.max_tokens: is 150, but model.pe_max_len 100" in err
    assert "Set model.pe_max_len >= 150" in err
    assert not (sharded_project_copy / "model_checkpoints" / "short").exists()  # refused before writing
