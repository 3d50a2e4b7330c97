"""Cheap content fingerprints of source files, so a re-run notices a changed input.

Hashing every byte of hundreds of multi-GB files on each `build` and `status` would cost more
than sharding them, so the fingerprint hashes the size plus 16 evenly spaced 64 KiB blocks
(head and tail included). Any rewrite of an .h5ad changes its HDF5 superblock or metadata
blocks, which the sampled blocks include; an in-place edit of a few bytes in the middle of a
chunk could escape it, which is why the size and mtime are recorded beside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK = 64 * 1024
N_BLOCKS = 16


def _hash_file(digest, path: Path) -> int:
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= BLOCK * N_BLOCKS:
            digest.update(fh.read())
        else:
            for i in range(N_BLOCKS):   # the first block starts at 0, the last ends at EOF
                fh.seek((size - BLOCK) * i // (N_BLOCKS - 1))
                digest.update(fh.read(BLOCK))
    return size


def source_fingerprint(path: Path) -> tuple[str, int]:
    """(fingerprint, size in bytes) of an .h5ad file or an AnnData .zarr directory."""
    digest = hashlib.blake2b(digest_size=16)
    path = Path(path)
    if path.is_dir():
        total = 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                file = Path(root) / name
                digest.update(str(file.relative_to(path)).encode())
                total += _hash_file(digest, file)
        return "blake2b-sampled:" + digest.hexdigest(), total
    size = _hash_file(digest, path)
    return "blake2b-sampled:" + digest.hexdigest(), size
