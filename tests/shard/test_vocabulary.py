"""Gene ids to tokens: `strip_versions` is `strip_version` of each id, `Vocabulary.tokens_of` is
the mapping's lookup of each id (-1 outside it, an empty vocabulary included), and a vocabulary's
fingerprint, which checkpoints and datasets record, stays what it was."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from concept_shard.cells import build_gene_map
from concept_shard.errors import ShardError
from concept_shard.vocabulary import _read_vocabulary, strip_version, strip_versions

IDS = ["ENSG01.12", "ENSG02", "X.1a", "A.1.2", "..3", "", "E3.", "a\rb.4", "v.\u0663", "g.10\n", "h\nk.2"]


@pytest.mark.parametrize("ids", [IDS, IDS[:4], IDS[:1], [], ["ENSG1.1"] * 3])
def test_strip_versions_is_strip_version_of_each(ids):
    got = strip_versions(np.array(ids, dtype=object))
    assert got.dtype == object and got.tolist() == [strip_version(g) for g in ids]


def test_strip_versions_refuses_what_strip_version_refuses():
    with pytest.raises(TypeError):
        strip_versions(np.array(["ENSG1.1", 5], dtype=object))


def _vocabulary(tmp_path, rows: list[str]):
    path = tmp_path / "hsapiens.csv"
    path.write_text("gene_id,gene_name,token\n<cls>,,0\n<pad>,,1\n" + "".join(f"{r}\n" for r in rows))
    return _read_vocabulary(path, "hsapiens")


def test_tokens_of_is_the_mapping_of_each_id(tmp_path):
    vocab = _vocabulary(tmp_path, ["ENSG1.3,A,2", "ENSG2,B,3", "ENSG3,C,5"])
    ids = np.array(["ENSG1", "ENSG3", "ENSG1.3", "nope", "", "ENSG2", "ENSG3", "<cls>"], dtype=object)
    assert vocab.tokens_of(ids).tolist() == [vocab.token_of.get(g, -1) for g in ids] == [2, 5, -1, -1, -1, 3, 5, -1]
    assert vocab.tokens_of(ids).dtype == np.int32 and vocab.tokens_of(np.array([], dtype=object)).tolist() == []


def test_an_empty_vocabulary_shares_no_gene_id_by_name(tmp_path):
    vocab = _vocabulary(tmp_path, [])
    assert vocab.tokens_of(np.array(["ENSG1", "ENSG2"], dtype=object)).tolist() == [-1, -1]
    with pytest.raises(ShardError, match="shares no gene id"):
        build_gene_map(tmp_path / "cells.h5ad", np.array(["ENSG1", "ENSG2"], dtype=object), vocab, None)


def test_duplicate_ids_after_stripping_are_named(tmp_path):
    vocab = _vocabulary(tmp_path, ["ENSG1,A,2", "ENSG2,B,3"])
    ids = np.array(["ENSG2.1", "ENSG1.1", "ENSG1.2", "ENSG2", "ENSG3"], dtype=object)
    with pytest.raises(ShardError) as err:
        build_gene_map(tmp_path / "x.h5ad", ids, vocab, None)
    said = " ".join(str(err.value).split())  # (wrapped at the terminal width)
    assert "duplicate gene ids after removing version suffixes (2 ids, e.g. ['ENSG1', 'ENSG2'])" in said


def test_the_fingerprint_of_a_vocabulary_is_unchanged(tmp_path):
    """sha256 of "gene_id,token" lines in token order (version suffixes stripped): recorded by every
    dataset and checkpoint, so a change would call them all stale."""
    vocab = _vocabulary(tmp_path, ["ENSG2.7,B,3", "ENSG1,A,2"])
    assert vocab.fingerprint == "sha256:" + hashlib.sha256(b"<cls>,0\n<pad>,1\nENSG1,2\nENSG2,3\n").hexdigest()
    assert vocab.fingerprint == "sha256:3c804906cb4686802cb73008f3e86b37b0952959ec41f667974148a13ede6595"
