"""What `concept-eval` writes into its output directory.

- `metrics.json`: everything measured, per embedding, with what was evaluated;
- `scib.csv`: one row per embedding, the scIB metrics and their aggregates (scib.py);
- `umap.png`: one row per embedding, coloured by the label key and by the batch key;
- `report.md`: the model's row beside the baselines, in a few lines.
The files are written into a staging directory inside the output directory and published as one
set when all are written (`staged`): a killed or failed evaluation leaves the previous set as it
was, never one run's metrics.json beside another's report.md, and a set without umap.png removes
the previous one's.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .scib import BATCH, BIO, METRICS, TOTAL

MAX_LEGEND = 20  # categories named in a UMAP legend; the rest are drawn grey


OUTPUTS = ("scib.csv", "umap.png", "report.md", "metrics.json")  # published in this order
_STAGE = ".concept-eval."


@contextmanager
def staged(out_dir: Path):
    """A staging directory in `out_dir` to write a set of OUTPUTS into; when the block ends
    without an error they replace the previous set (an output not written this time is removed,
    metrics.json goes last), else the stage is removed and the previous set stays."""
    out_dir = Path(out_dir)
    for old in out_dir.glob(f"{_STAGE}*.tmp"):  # left by a killed evaluation whose process is gone
        if not _alive(old.name[len(_STAGE) : -len(".tmp")]):
            shutil.rmtree(old, ignore_errors=True)
    stage = out_dir / f"{_STAGE}{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        for name in OUTPUTS:
            if (stage / name).is_file():
                os.replace(stage / name, out_dir / name)
            else:
                (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_metrics(out_dir: Path, result: dict) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")


def write_scib_csv(out_dir: Path, scib: dict[str, dict[str, float]]) -> None:
    columns = [*METRICS, BIO, BATCH, TOTAL]
    lines = ["Embedding," + ",".join(columns)]
    lines += [
        name + "," + ",".join("" if scores[c] is None else f"{scores[c]:.6g}" for c in columns)
        for name, scores in scib.items()
    ]
    (out_dir / "scib.csv").write_text("\n".join(lines) + "\n")


def umap_coordinates(x: np.ndarray, seed: int = 0) -> np.ndarray:
    import umap

    n_neighbors = max(2, min(15, len(x) - 1))
    return umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(x)


# distinct colours: tab10's ten, then Dark2's and Set1's (tab20 pairs a dark and a light shade of
# one hue, so T and B cells were both blue)
PALETTE = [
    *[f"C{i}" for i in range(10)],
    *["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"],
    *["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf"],
]


def write_umap_png(
    out_dir: Path,
    coordinates: dict[str, np.ndarray],
    colour_by: dict[str, np.ndarray],
    scores: dict[str, dict[str, str]] | None = None,
) -> None:
    """A grid: rows = embeddings, columns = obs keys (label, batch); `scores[embedding][key]`, a
    short text of the embedding's scores for that key, goes into the panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(coordinates), len(colour_by)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    for i, (name, xy) in enumerate(coordinates.items()):
        for j, (key, values) in enumerate(colour_by.items()):
            ax = axes[i][j]
            kinds, counts = np.unique(values, return_counts=True)
            named = kinds[np.argsort(-counts)][:MAX_LEGEND]
            other = ~np.isin(values, named)
            if other.any():
                ax.scatter(xy[other, 0], xy[other, 1], s=2, c="lightgrey", label="other", rasterized=True)
            for c, kind in enumerate(sorted(named)):
                sel = values == kind
                ax.scatter(
                    xy[sel, 0],
                    xy[sel, 1],
                    s=2,
                    color=PALETTE[c % len(PALETTE)],
                    label=str(kind) or "(missing)",
                    rasterized=True,
                )
            score = (scores or {}).get(name, {}).get(key)
            ax.set_title(f"{name}: {key}" + (f"\n{score}" if score else ""), fontsize=10)
            ax.set_xlabel("UMAP 1")
            ax.set_ylabel("UMAP 2")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "umap.png", dpi=90, format="png")
    plt.close(fig)


def report_markdown(result: dict, umap: bool = True) -> str:
    """The table a reader wants first: each embedding's aggregates and kNN accuracy, recall;
    `umap`: whether umap.png was drawn (--no-umap: not listed)."""
    s = result["settings"]
    keys = list(next(iter(result["knn"].values())).keys())
    lines = [
        f"# concept-eval: {result['model']['run_id']} at step {result['model']['step']}",
        "",
        f"{result['cells']['evaluated']:,} {result['cells']['species']} cells from "
        f"{len(result['cells']['inputs'])} input(s); label `{s['label_key']}`, "
        + (
            f"batch `{s['batch_key']}`."
            if s["batch_key"] is not None
            else "no batch key (no other obs column varies): batch correction and the total are n/a."
        ),
        "",
        "| embedding | scIB total | bio conservation | batch correction | "
        + " | ".join(f"kNN {k}" for k in keys)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for name, scores in result["scib"].items():
        knn = result["knn"][name]
        lines.append(
            f"| {name} | {_score(scores[TOTAL])} | {_score(scores[BIO])} | {_score(scores[BATCH])} | "
            + " | ".join(f"{knn[k]:.3f}" for k in keys)
            + " |"
        )
    lines += ["", "Cross-view recall@1 (two disjoint random panels per block of cells, chance in brackets):", ""]
    for size, r in result["recall"].items():
        lines.append(
            f"- {size} genes: "
            + (
                f"{r['recall@1']:.3f} ({r['chance']:.4f}), {r['cells']:,} cells"
                if r["recall@1"] is not None
                else f"not measured: {r['reason']}"
            )
        )
    files = ["`scib.csv` (every scIB metric)", *(["`umap.png`"] if umap else []), "`metrics.json`"]
    lines += ["", f"Files: {', '.join(files)}.", ""]
    return "\n".join(lines)


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(out_dir: Path, result: dict) -> str:
    text = report_markdown(result, umap=(out_dir / "umap.png").is_file())
    (out_dir / "report.md").write_text(text)
    return text
