"""The training loader's view filters (scConcept's `dataset.train` keys), all pure functions of
(seed, g) and the cell's position in the global batch:

- `feature_max_drop_rate`: per batch r ~ U(0, max) (from (seed, g)); each candidate gene of each
  cell's view is dropped with probability r before the `max_tokens` cut. The draw for (view, cell,
  gene) is a counter-based hash of (seed, g, view, position of the cell in the GLOBAL batch, token),
  so a cell's views do not depend on how the batch is split over ranks, and no generator is made
  per cell.
- `qc_threshold`: a cell is masked when, in either view, its length (genes in the view as
  delivered, after the `max_tokens` cut; `<cls>` not counted) is <= the view's panel size x
  threshold. With `max_tokens` below panel size x threshold every cell of the batch is masked.
- `max_total_seq_length`: a token budget: going through the cells in order, a cell is masked once
  the cumulative length of both its views (as for `qc_threshold`; cells masked by it not counted)
  passes the budget. It applies to the batch each rank holds (the reference's collate runs per
  device on the local batch: the budget bounds one device's memory), so with several ranks it
  depends on the world size, as the reference does; it is exact on resumption with the same
  world size.

A masked cell has `items_mask` False (it leaves the loss and the metrics) and its two sequences
are delivered as `<cls>` alone, so a masked cell costs the model nothing and the budget really
bounds the tokens of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concept_config.data import TrainDatasetKeys

from ..order.permutation import splitmix64

FILTER_KEYS = ("feature_max_drop_rate", "qc_threshold", "max_total_seq_length")


def hashed_uniform(seed: int, g: int, view: int, position: np.ndarray, token: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per (seed, g, view, position, token), the same in every process."""
    base = np.array([seed & (2**64 - 1)], np.uint64)
    for part in (g, view):
        base = splitmix64(base ^ np.array([part], np.uint64))
    h = splitmix64(base ^ np.asarray(position, np.int64).astype(np.uint64))
    h = splitmix64(h ^ np.asarray(token, np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class ViewFilters:
    feature_max_drop_rate: float | None = None
    qc_threshold: float | None = None
    max_total_seq_length: int | None = None

    @classmethod
    def from_keys(cls, train: TrainDatasetKeys) -> ViewFilters:
        """The training loader's filters (the schema checked their ranges)."""
        return cls(train.feature_max_drop_rate, train.qc_threshold, train.max_total_seq_length)

    @property
    def active(self) -> bool:
        return (
            bool(self.feature_max_drop_rate) or self.qc_threshold is not None or self.max_total_seq_length is not None
        )

    def spec(self) -> dict:
        return {k: getattr(self, k) for k in FILTER_KEYS if getattr(self, k) is not None}

    def drop_rate(self, seed: int, g: int) -> float:
        """The batch's r ~ U(0, feature_max_drop_rate); 0 when off."""
        if not self.feature_max_drop_rate:
            return 0.0
        return float(np.random.default_rng([seed, int(g), 4]).uniform(0, self.feature_max_drop_rate))

    @staticmethod
    def keep(seed: int, g: int, view: int, positions: np.ndarray, rate: float):
        """keep(cell, token) for select_view: drop with probability `rate`; `positions` maps this
        rank's cell index to the cell's position in the global batch."""

        def keep(cell: np.ndarray, token: np.ndarray) -> np.ndarray:
            return hashed_uniform(seed, g, view, positions[cell], token) >= rate

        return keep

    def masked(self, lengths: np.ndarray, panel_sizes: tuple[int, int]) -> np.ndarray:
        """Per cell, whether a filter masks it: `lengths` [2, n] genes per view."""
        out = np.zeros(lengths.shape[1], bool)
        if self.qc_threshold is not None:
            limit = np.asarray(panel_sizes, np.float64)[:, None] * float(self.qc_threshold)
            out |= (lengths <= limit).any(axis=0)
        if self.max_total_seq_length is not None:
            used = np.where(out, 0, lengths.sum(axis=0))
            out |= np.cumsum(used) > self.max_total_seq_length
        return out
