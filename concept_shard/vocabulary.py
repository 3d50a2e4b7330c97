"""A species' token mapping (`<species>.csv`: gene_id,gene_name,token; `<cls>`=0, `<pad>`=1)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ShardError

CLS, PAD = "<cls>", "<pad>"
CLS_TOKEN, PAD_TOKEN = 0, 1  # the same in every species' token space
MAX_TOKENS = 1 << 22  # 4.2M tokens: far above any species' ~60k genes, and a table that fits
_VERSION_SUFFIX = re.compile(r"\.\d+$")
_VERSION_SUFFIXES = re.compile(r"\.\d+$", re.MULTILINE)


def strip_version(gene_id: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510`; IDs without a numeric suffix are kept."""
    return _VERSION_SUFFIX.sub("", gene_id)


def strip_versions(gene_ids) -> np.ndarray:
    """`strip_version` of each id (an object array): one regex pass over the ids joined by line
    breaks, where a call per id costs ~1 us (60k-gene vocabularies and 36k-gene files, per build)."""
    ids = gene_ids.tolist() if isinstance(gene_ids, np.ndarray) else list(gene_ids)
    try:
        text = "\n".join(ids)
    except TypeError:  # an id that is not a string: strip_version's own TypeError
        text = None
    if text is None or text.count("\n") != max(len(ids) - 1, 0):  # (or one with a line break)
        return np.array([strip_version(g) for g in ids], dtype=object)
    out = np.empty(len(ids), dtype=object)
    if ids:
        out[:] = _VERSION_SUFFIXES.sub("", text).split("\n")
    return out


@dataclass
class Vocabulary:
    species: str
    path: Path
    token_of: dict[str, int]  # gene id (no version) -> token
    size: int  # max token + 1
    fingerprint: str

    @cached_property
    def gene_id_of_token(self) -> list[str]:
        """Token -> gene id (no version); "" for `<cls>`, `<pad>` and unused tokens."""
        ids = [""] * self.size
        for gene_id, token in self.token_of.items():
            ids[token] = gene_id
        return ids

    @cached_property
    def _lookup(self) -> tuple[pd.Index, np.ndarray]:
        """The gene ids, and their tokens followed by -1 (what an id outside the index, -1, reads)."""
        tokens = np.fromiter(self.token_of.values(), np.int64, count=len(self.token_of))
        return pd.Index(list(self.token_of), dtype=object), np.append(tokens, -1)

    def tokens_of(self, gene_ids: np.ndarray) -> np.ndarray:
        """The token of each gene id (without version), -1 outside the vocabulary (int32): one
        hashed lookup for all of them."""
        index, tokens = self._lookup
        return tokens[index.get_indexer(gene_ids)].astype(np.int32)

    @property
    def gene_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every token id."""
        return np.dtype(np.uint16) if self.size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


_FIX = (
    "Rebuild it with header `gene_id,gene_name,token`, rows `<cls>,,0` and `<pad>,,1` first, "
    "then one row per gene with a unique integer token."
)
# Vocabularies read in this process, by file identity: a training process reads each one in the
# catalog and again for the checkpoint, a notebook or a test session once per build (~0.2 s for
# 60k genes). A file changed since (mtime, size or inode) is read again. Treat them as read-only.
_LOADED: dict[tuple, Vocabulary] = {}
_LOADED_MAX = 32


def mapping_file(mappings: Path, species: str) -> Path:
    """The token mapping CSV of a species: `<mappings>/<species>.csv` (PATH.GENE_MAPPINGS_PATH, a
    directory), or `mappings` itself when it is a file: scConcept's trees of early 2026 named one
    CSV for every species (PATH.GENE_MAPPING_PATH), one token space shared by all of them."""
    mappings = Path(mappings)
    return mappings if mappings.is_file() else mappings / f"{species}.csv"


def load_vocabulary(mappings_dir: Path, species: str) -> Vocabulary:
    """The vocabulary of `species` from its mapping CSV (`mapping_file`), read once per process."""
    path = mapping_file(mappings_dir, species)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(path, f"no token mapping for species '{species}'.", _FIX) from None
    except OSError as exc:
        raise ShardError(path, f"cannot be read as a token mapping CSV ({exc}).", _FIX) from None
    key = (str(path.absolute()), species, st.st_mtime_ns, st.st_size, st.st_ino)
    vocab = _LOADED.get(key)
    if vocab is None:
        vocab = _read_vocabulary(path, species)
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = vocab
    return vocab


def _read_vocabulary(path: Path, species: str) -> Vocabulary:
    fix = _FIX
    try:
        table = pd.read_csv(path, dtype={"gene_id": str, "gene_name": str}, keep_default_na=False)
    except FileNotFoundError:
        raise ShardError(path, f"no token mapping for species '{species}'.", fix) from None
    except Exception as exc:  # malformed CSV of any kind
        raise ShardError(path, f"cannot be read as a token mapping CSV ({exc}).", fix) from None
    if not {"gene_id", "token"} <= set(table.columns):
        raise ShardError(path, f"has columns {list(table.columns)}, not gene_id and token.", fix)
    tokens = pd.to_numeric(table["token"], errors="coerce")
    if tokens.isna().any() or (tokens < 0).any():
        bad = table.loc[tokens.isna() | (tokens < 0), "gene_id"].head(3).tolist()
        raise ShardError(path, f"has missing or negative tokens (e.g. for {bad}).", fix)
    # tokens index the model's embedding table: one of 3e9 would ask for a table of 3e9 rows
    too_large = (tokens >= MAX_TOKENS) | (tokens != np.floor(tokens))
    if too_large.any():
        bad = table.loc[too_large, ["gene_id", "token"]].head(3).values.tolist()
        raise ShardError(
            path,
            f"has tokens that are not integers below {MAX_TOKENS:,} (e.g. {bad}).",
            fix + " Number the genes 2, 3, ... without gaps.",
        )
    blank = table["gene_id"].str.strip() == ""
    if blank.any():
        raise ShardError(
            path,
            f"has {int(blank.sum())} row(s) without a gene id (first at data row "
            f"{int(np.flatnonzero(blank.to_numpy())[0]) + 1}).",
            fix,
        )
    tokens = pd.Series(tokens.to_numpy(np.int64), index=table.index)
    ids = pd.Series(strip_versions(table["gene_id"].to_numpy(dtype=object)), index=table.index)
    token_of = dict(zip(ids.tolist(), tokens.tolist()))
    if token_of.get(CLS) != 0 or token_of.get(PAD) != 1:
        raise ShardError(
            path,
            f"must map {CLS} to 0 and {PAD} to 1 (found {CLS}={token_of.get(CLS)}, {PAD}={token_of.get(PAD)}).",
            fix,
        )
    dup_tokens = tokens[tokens.duplicated()].unique()
    if len(dup_tokens):
        raise ShardError(path, f"gives the same token to several genes (tokens {dup_tokens[:5].tolist()}).", fix)
    dup_ids = ids[ids.duplicated()].unique()
    if len(dup_ids):
        raise ShardError(path, f"lists gene ids more than once (e.g. {dup_ids[:5].tolist()}).", fix)
    digest = hashlib.sha256(
        "".join(f"{gene_id},{token}\n" for gene_id, token in sorted(token_of.items(), key=lambda kv: kv[1])).encode()
    )
    del token_of[CLS], token_of[PAD]
    return Vocabulary(species, path, token_of, int(tokens.max()) + 1, "sha256:" + digest.hexdigest())
