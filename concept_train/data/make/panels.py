"""The two gene panels of a global batch, drawn from (seed, batch index) alone.

Semantics of the reference (docs/design.md, "Batches, panels and tokens"), over the n in-vocabulary genes of the
batch's file: view 1 is random if n < 10,000 (a targeted assay), else random or a designed panel per
`panel_selection` (`mixed`: random with probability `panel_selection_mixed_prob`). A designed panel
is drawn uniformly from the species' panel CSVs whose name matches `panel_filter_regex`; each of
its genes is dropped with probability r ~ U(0, panel_max_drop_rate). Random panels have a
log-uniform size in [panel_size_min, panel_size_max] (a float in (0, 1) is a fraction of n).
View 2 is random over the genes not in view 1, unless `panel_overlap` (a bool or a probability)
lets it draw from all n; `panel_view2: complement` (ours, for validation) makes view 2 all the
remaining genes. Ours too: a random view 1 leaves at least `panel_size_min` genes for a disjoint
view 2 (the reference can draw view 1 over all n genes, leaving view 2 empty and the whole batch
masked).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from concept_config.data import PANEL_SELECTIONS, PANEL_VIEW2, PanelKeys
from concept_shard.errors import DataError
from concept_shard.vocabulary import Vocabulary, strip_version

TARGETED_ASSAY_GENES = 10_000


@dataclass
class DesignedPanel:
    name: str
    tokens: np.ndarray  # ascending token ids of the panel's genes that are in the vocabulary


def load_designed_panels(panels_dir: Path, vocab: Vocabulary, regex: str, log=print) -> list[DesignedPanel]:
    """The species' panel CSVs whose file name matches `regex`, mapped to token ids.

    Panel genes missing from the vocabulary are counted and reported once per panel.
    """
    species_dir = Path(panels_dir) / vocab.species
    if not species_dir.is_dir():
        return []
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise DataError(
            "panel_filter_regex",
            f"'{regex}' is not a valid regular expression ({err}).",
            "Fix the pattern (Python `re` syntax).",
        ) from None
    panels = []
    for path in sorted(species_dir.glob("*.csv")):
        if not pattern.search(path.stem):
            continue
        fix = "A panel CSV needs a column `Ensembl_ID` with one gene id per row."
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as err:
            raise DataError(path, f"cannot be read as a panel CSV ({type(err).__name__}: {err}).", fix) from None
        if "Ensembl_ID" not in table.columns:
            raise DataError(path, f"has no `Ensembl_ID` column (columns: {list(table.columns)}).", fix)
        ids = [strip_version(g.strip()) for g in table["Ensembl_ID"] if g.strip()]
        if not ids:
            raise DataError(path, "lists no genes.", fix + " Remove the file or fill it.")
        tokens = np.array(sorted({vocab.token_of[g] for g in ids if g in vocab.token_of}), dtype=np.int64)
        missing = len(set(ids)) - len(tokens)
        if missing:
            log(
                f"[panels] {path}: {missing} of {len(set(ids))} genes are not in the {vocab.species} vocabulary; "
                "they are ignored."
            )
        if len(tokens) == 0:
            raise DataError(
                path,
                f"has no gene in the {vocab.species} vocabulary {vocab.path}.",
                "Check that the panel's species matches its folder and that the ids are Ensembl ids.",
            )
        panels.append(DesignedPanel(path.stem, tokens))
    return panels


@dataclass
class PanelSpec:
    """The panel keys of a loader (or of one curriculum phase) as the sampler reads them."""

    selection: str
    mixed_prob: float
    size_min: float
    size_max: float
    max_drop_rate: float
    overlap: float  # probability that view 2 may overlap view 1
    view2: str

    @classmethod
    def from_keys(cls, keys: PanelKeys, where: str) -> PanelSpec:
        """The loader's keys, or a curriculum phase's over them: the schema checked the former,
        a phase's values (free-form YAML) are checked here against the same choices."""
        overlap = keys.panel_overlap
        overlap = 1.0 if overlap is True else 0.0 if overlap in (False, None) else float(overlap)
        spec = cls(
            selection=str(keys.panel_selection),
            mixed_prob=float(keys.panel_selection_mixed_prob),
            size_min=float(keys.panel_size_min),
            size_max=float(keys.panel_size_max),
            max_drop_rate=float(keys.panel_max_drop_rate),
            overlap=overlap,
            view2=str(keys.panel_view2),
        )
        if spec.selection not in PANEL_SELECTIONS:
            raise DataError(
                f"{where}.panel_selection", f"is '{spec.selection}'.", f"Use one of {list(PANEL_SELECTIONS)}."
            )
        if spec.view2 not in PANEL_VIEW2:
            raise DataError(f"{where}.panel_view2", f"is '{spec.view2}'.", f"Use one of {list(PANEL_VIEW2)}.")
        if not 0 <= spec.overlap <= 1 or not 0 <= spec.mixed_prob <= 1 or not 0 <= spec.max_drop_rate <= 1:
            raise DataError(
                where,
                "has panel_overlap, panel_selection_mixed_prob or panel_max_drop_rate outside [0, 1].",
                "Use probabilities between 0 and 1 (panel_overlap may also be true/false).",
            )
        if spec.size_min <= 0 or spec.size_max <= 0:
            raise DataError(
                where,
                "has a non-positive panel_size_min or panel_size_max.",
                "Use a fraction in (0, 1) of the file's genes or a gene count >= 1.",
            )
        return spec


PANEL_KEYS = (
    "panel_selection",
    "panel_selection_mixed_prob",
    "panel_size_min",
    "panel_size_max",
    "panel_max_drop_rate",
    "panel_overlap",
    "panel_view2",
)


def curriculum_specs(keys: PanelKeys, where: str) -> list[tuple[int, PanelSpec]]:
    """[(first global batch, PanelSpec)] in batch order: the loader's own panel keys from batch 0,
    then each `panel_curriculum` phase's keys (over the loader's) from its `from_batch` on."""
    phases = [(0, PanelSpec.from_keys(keys, where))]
    merged = {}
    for i, phase in enumerate(keys.panel_curriculum or []):
        at = f"{where}.panel_curriculum[{i}]"
        phase = dict(phase) if hasattr(phase, "items") else None
        if phase is None or "from_batch" not in phase:
            raise DataError(
                at,
                "is not a mapping with `from_batch`.",
                "Write each phase as {from_batch: N, panel_size_max: ..., ...} (panel keys of the loader).",
            )
        unknown = sorted(set(phase) - {"from_batch", *PANEL_KEYS})
        if unknown:
            raise DataError(at, f"has unknown keys {unknown}.", f"A phase may set `from_batch` and {list(PANEL_KEYS)}.")
        start = phase.pop("from_batch")
        if not isinstance(start, int) or isinstance(start, bool) or start <= phases[-1][0]:
            raise DataError(
                f"{at}.from_batch",
                f"is {start!r}.",
                "Use a global batch index (training step x accumulate_grad_batches), greater than the "
                "previous phase's.",
            )
        merged.update(phase)
        phases.append((start, PanelSpec.from_keys(replace(keys, **merged), at)))
    return phases


@dataclass
class Panels:
    view1: np.ndarray  # ascending token ids
    view2: np.ndarray
    kind1: str  # "random" or "designed:<name>"
    kind2: str  # "random", "random-overlap" or "complement"


def resolve_size(bound: float, n: int) -> float:
    """A float in (0, 1) is a fraction of the file's n genes; anything else a gene count."""
    return bound * n if 0 < bound < 1 else bound


class PanelSampler:
    def __init__(self, spec: PanelSpec, designed: dict[str, list[DesignedPanel]], where: str = "loader"):
        self.spec, self.designed = spec, designed
        if spec.selection == "preselected":
            empty = [sp for sp, panels in designed.items() if not panels]
            if empty:
                raise DataError(
                    f"{where}.panel_selection",
                    f"is 'preselected' but species {empty} have no panel CSV matching panel_filter_regex.",
                    "Add panels under PATH.PANELS_PATH/<species>/, widen the regex, or use `mixed`.",
                )

    def _size(self, rng: np.random.Generator, n: int, available: int) -> int:
        lo = max(1.0, resolve_size(self.spec.size_min, n))
        hi = max(lo, resolve_size(self.spec.size_max, n))
        size = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if hi > lo else int(round(lo))
        return max(0, min(size, available))

    def draw(self, rng: np.random.Generator, genes: np.ndarray, species: str) -> Panels:
        """Two panels over `genes` (the batch's in-vocabulary genes, ascending token ids)."""
        spec, n = self.spec, len(genes)
        overlap = spec.view2 == "random" and spec.overlap > 0 and rng.random() < spec.overlap
        # a disjoint view 2 needs room: a random view 1 leaves at least panel_size_min genes
        room = n if overlap or spec.view2 == "complement" else n - int(max(1.0, resolve_size(spec.size_min, n)))
        panels = self.designed.get(species) or []
        use_designed = (
            n >= TARGETED_ASSAY_GENES
            and panels
            and (spec.selection == "preselected" or (spec.selection == "mixed" and rng.random() >= spec.mixed_prob))
        )
        view1 = None
        if use_designed:
            panel = panels[int(rng.integers(len(panels)))]
            kept = panel.tokens[rng.random(len(panel.tokens)) >= rng.uniform(0, spec.max_drop_rate)]
            taken = np.zeros(n, bool)  # np.intersect1d(kept, genes), without its sort
            at = np.minimum(np.searchsorted(genes, kept), n - 1)
            taken[at[genes[at] == kept]] = True
            view1 = genes[taken]
            kind1 = f"designed:{panel.name}"
        if view1 is None or len(view1) == 0:  # random, or a designed panel with none of the file's genes
            view1, taken = _sorted_choice(rng, genes, self._size(rng, n, max(1, room)))
            kind1 = "random"
        rest = genes[~taken]  # np.setdiff1d(genes, view1)
        if spec.view2 == "complement":
            return Panels(view1, rest, kind1, "complement")
        if overlap:
            return Panels(view1, _sorted_choice(rng, genes, self._size(rng, n, n))[0], kind1, "random-overlap")
        return Panels(view1, _sorted_choice(rng, rest, self._size(rng, n, len(rest)))[0], kind1, "random")


def _sorted_choice(rng: np.random.Generator, pool: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """np.sort(rng.choice(pool, size, replace=False)) of an ascending pool, and which of its
    elements that took, without the sort (a third of a batch's panel time): numpy's choice over an
    array draws indices exactly as over its length, then takes them; ascending indices of an
    ascending pool are ascending values."""
    taken = np.zeros(len(pool), bool)
    taken[rng.choice(len(pool), size, replace=False)] = True
    return pool[taken], taken
