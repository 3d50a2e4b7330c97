"""The model-ready batch a loader delivers (one rank's slice of a global batch)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=1 << 16)
def label_code(value: str) -> int:
    """A stable integer for an obs label: the same string gives the same code in every run and
    process, without a pass over the data to build an encoder. Missing ("") is -1."""
    if value == "":
        return -1
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class Batch:
    # packed tokens: view 1 of every cell, then view 2 of every cell
    tokens: torch.Tensor  # int64 [T]
    values: torch.Tensor  # float32 [T]
    positions: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [2B + 1]
    max_seqlen: int
    items_mask: torch.Tensor  # bool [B]: False where a view of the cell is empty (excluded from the loss)
    # per cell
    species: torch.Tensor  # int64 [B]: index into datamodule.species
    dataset: torch.Tensor  # int64 [B]: index of the cell's dataset in the loader's list
    row: torch.Tensor  # int64 [B]: the cell's row in its source file
    labels: dict[str, torch.Tensor]  # obs key -> int64 [B] label codes (label_code)
    # per batch
    panels: tuple[torch.Tensor, torch.Tensor]  # the two panels (token ids, ascending)
    panel_kinds: tuple[str, str]
    index: int  # global batch index g
    epoch: int
    cell_ids: list[str] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return int(self.items_mask.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the batch by name (labels and panels flattened), for comparisons."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
            elif f.name == "labels":
                out.update({f"labels.{k}": t for k, t in v.items()})
            elif f.name == "panels":
                out.update({"panels.0": v[0], "panels.1": v[1]})
        return out

    def rest(self) -> dict:
        """Every field that is not a tensor (with `tensors()`, the whole batch)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("labels", "panels") and not isinstance(getattr(self, f.name), torch.Tensor)
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **rest) -> Batch:
        """The inverse of (`tensors()`, `rest()`)."""
        labels = {k[len("labels.") :]: t for k, t in tensors.items() if k.startswith("labels.")}
        plain = {k: t for k, t in tensors.items() if not k.startswith(("labels.", "panels."))}
        return cls(**plain, labels=labels, panels=(tensors["panels.0"], tensors["panels.1"]), **rest)

    def to(self, device, non_blocking: bool = True) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        moved["labels"] = {k: t.to(device, non_blocking=non_blocking) for k, t in self.labels.items()}
        return Batch(**moved)


class Layout:
    """Named 1-D arrays of several dtypes in one byte buffer (each 8-byte aligned), as NumPy
    arrays to fill and as tensors of one storage. Why one storage: a DataLoader worker hands
    each storage over separately (a shared-memory segment, and its descriptor through a socket
    round trip to the worker), which cost more than making the batch's arrays."""

    def __init__(self, parts: list[tuple[str, int, np.dtype]]):
        self.parts, offset = [], 0
        for name, n, dtype in parts:
            dtype = np.dtype(dtype)
            self.parts.append((name, offset, int(n), dtype))
            offset += -(-int(n) * dtype.itemsize // 8) * 8
        self.nbytes = max(offset, 8)  # torch views no dtype over an empty byte tensor (an empty rank slice)

    def arrays(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        return {name: raw[o : o + n * dt.itemsize].view(dt) for name, o, n, dt in self.parts}

    def tensors(self, raw: np.ndarray) -> dict[str, torch.Tensor]:
        joined = torch.from_numpy(raw)
        return {name: joined[o : o + n * dt.itemsize].view(_TORCH[dt]) for name, o, n, dt in self.parts}


_TORCH = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.bool_): torch.bool,
}
