"""Cells of 20,000 tokens, as scConcept's largest published model reads them: the CPU attention
path computes them exactly without a score matrix, and a rank encoding too short for a run's or an
embedding's genes per cell is refused by name (it silently gave every gene ranked beyond it one
shared position)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import TINY

from concept_train.cli import main as train

LONG = r"""
import json, math, resource, torch
from concept_train.model.attention import grouped_attention

torch.manual_seed(0)
lengths, H, D = [20000, 1000], 2, 32
q, k, v = (torch.randn(sum(lengths), H, D) for _ in range(3))
cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = grouped_attention(q, k, v, cu)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
err = 0.0
for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):  # float64, 2,000 queries at a time: the short
    K, V = k[a:b].double().transpose(0, 1), v[a:b].double().transpose(0, 1)  # cell's, and the long
    for s in [a] if b - a <= 2000 else [a, a + 9000, b - 2000]:  # one's first, middle and last
        Q = q[s:min(s + 2000, b)].double().transpose(0, 1)
        ref = torch.softmax(Q @ K.transpose(1, 2) / math.sqrt(D), -1) @ V
        err = max(err, (out[s:min(s + 2000, b)].double().transpose(0, 1) - ref).abs().max().item())
print(json.dumps({"err": err, "grew_mb": grew}))
"""


def test_attention_over_20000_tokens_equals_float64_without_a_score_matrix():
    """A cell of 20,000 tokens beside one of 1,000 (2 heads): one head's score matrix alone would
    take 1,526 MB in float32; the path's peak memory grows by a small part of that."""
    done = subprocess.run([sys.executable, "-c", LONG], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["err"] < 1e-5, found
    assert found["grew_mb"] < 300, found  # a score matrix of one head: 20,000^2 x 4 B = 1,526 MB


def test_genes_beyond_the_rank_encoding_are_refused_by_name(sharded_project_copy, capsys):
    run = [str(sharded_project_copy), *TINY, "model.pe_max_len=100", "initialize.run_id=short"]
    assert train([*run, "datamodule.dataset.train.max_tokens=150"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "datamodule.dataset.train.max_tokens: is 150, but model.pe_max_len 100" in err
    assert "Set model.pe_max_len >= 150" in err
    assert not (sharded_project_copy / "model_checkpoints" / "short").exists()
