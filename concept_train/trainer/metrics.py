"""Where metrics go: the console, `metrics.jsonl` in the run directory, wandb when enabled, and a
PNG of the loss, recall and kNN curves at the end of the run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from concept_config.training import WandbKeys
from concept_shard import console
from concept_shard.errors import TrainError


class MetricsLog:
    def __init__(
        self,
        run_dir: Path,
        wandb_keys: WandbKeys,
        config: dict,
        enabled: bool,
        run_id: str,
        log=print,
        resumed_at: int | None = None,
        max_steps: int | None = None,
    ):
        """`wandb_keys`: the `wandb` section; `config`: the run's whole config as plain containers
        (what wandb records with the run); `resumed_at`: the step a resumed run continues from (its
        rows after it are dropped: an attempt killed after its last checkpoint wrote them), None for
        a new run (the rows of an attempt killed before its first checkpoint are dropped); a torn
        last line goes either way."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.log, self.max_steps = enabled, log, max_steps
        self._first: tuple[int, float] | None = None  # (step, time) of the first row shown: the ETA's base
        if enabled:
            _keep_through(self.path, resumed_at)
        self.wandb = None
        if enabled and wandb_keys.enabled:
            try:
                import wandb
            except ImportError:
                raise TrainError(
                    "wandb.enabled",
                    "is true, but the wandb package cannot be imported (a lean install, make install LEAN=1, "
                    "leaves it out).",
                    "Install it (pip install 'concept-pretrain[wandb]'), or set wandb.enabled=False.",
                ) from None

            self.wandb = wandb.init(
                project=wandb_keys.project or "concept",
                entity=wandb_keys.entity,
                name=wandb_keys.run_name or run_id,
                id=wandb_run_id(run_dir, run_id),
                resume="allow",
                dir=str(run_dir),
                config=config,
            )

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=int(row["step"])
            )
        progress = self._progress(row)
        shown = " ".join(
            _shown(k, v)
            for k, v in row.items()
            if k in ("loss", "lr", "recall@1", "cells_per_s", "tokens_per_s", "mfu")
        )
        table = validation_table(row)
        if shown or not table:
            self.log(f"[train] {progress} {shown}".rstrip())
        if table:
            self.log(f"[val] {progress}:")
            for line in table:
                self.log(f"[val]   {line}")
        console.detail(f"[train] {progress} " + " ".join(_shown(k, v) for k, v in row.items() if k != "step"))

    def _progress(self, row: dict) -> str:
        """`step=S/TOTAL eta=...` for a training row on the console (`step=S` for a validation row)."""
        step, now = int(row.get("step", 0)), time.monotonic()
        if row.get("kind") != "train" or not self.max_steps:
            return f"step={step}"
        if self._first is None:
            self._first = (step, now)
        done, elapsed = step - self._first[0], now - self._first[1]
        eta = f" eta={_duration((self.max_steps - step) * elapsed / done)}" if done > 0 else ""
        return f"step={step}/{self.max_steps}{eta}"

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _shown(key: str, value) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def validation_table(row: dict) -> list[str]:
    """A validation check as a small table, a loader a line (loss, recall@1, recall@5, each kNN
    accuracy, cells) instead of every `val/<loader>/<metric>` on one line."""
    loaders: dict[str, dict] = {}
    for key, value in row.items():
        if key.startswith("val/") and key.count("/") >= 2:
            _, loader, metric = key.split("/", 2)
            loaders.setdefault(loader, {})[metric] = value
    if not loaders:
        return []
    metrics = ["loss", "recall@1", "recall@5"]
    metrics += sorted({m for v in loaders.values() for m in v if m.startswith("knn/")})
    metrics += ["cells"] if any("cells" in v for v in loaders.values()) else []
    width = max(len("loader"), *(len(name) for name in loaders))
    heads = [f"knn({m[4:]})" if m.startswith("knn/") else m for m in metrics]
    widths = [max(9, len(h)) for h in heads]
    lines = [f"{'loader':<{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for name, values in loaders.items():
        cells = []
        for m, w in zip(metrics, widths):
            v = values.get(m, "-")
            cells.append(f"{v:>{w}.4g}" if isinstance(v, float) else f"{v!s:>{w}}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return lines


def wandb_run_id(run_dir: Path, run_id: str) -> str:
    """The wandb run id: the run id and a digest of the run directory, so that two projects that
    both name a run `first` write two wandb runs, while a resumed run continues its own."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{run_id}-{digest}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _keep_through(path: Path, step: int | None) -> None:
    """Cut metrics.jsonl back before a run writes to it: a last line without its newline (a kill
    while a row was written; the next row would be glued to it) and the rows after `step` (all of
    them for None) go, the file rewritten in one rename."""
    if not path.is_file():
        return
    *rows, torn = path.read_text().split("\n")  # torn: "" when the file ends with its newline
    kept = [] if step is None else [row for row in rows if _step_of(row) <= step]
    if torn or len(kept) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(row + "\n" for row in kept))
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return float("inf")  # not a row: dropped


def read_rows(metrics_path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not JSON (torn by a kill) is skipped."""
    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def train_rows_by_step(metrics_path: Path) -> dict[int, dict]:
    """The last train row written for each step (a resumed run rewrites the steps after its
    checkpoint): what resumption tests and tools/chaos.py compare with an uninterrupted run."""
    return {r["step"]: r for r in read_rows(metrics_path) if r.get("kind") == "train"}


def smoothed(values, window: int) -> list[float]:
    """Exponential moving average with the weight of a `window`-point running mean (beta =
    1 - 2 / (window + 1)), bias-corrected so the first points are not pulled towards zero."""
    beta = 1 - 2 / (max(1, window) + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta**i) if beta > 0 else avg)
    return out


def curve_panels(rows: list[dict], batch_size: int | None = None) -> list[dict]:
    """What curves.png draws, panel by panel: title, y label, its series (label, steps, values,
    style) and its chance line (None where chance is unknown). Training points are drawn faintly
    with a moving average over them (a window of 1/20 of the logged points, at least 5): per-file
    batches make single steps noisy, the average shows the trend."""
    train_steps = [r["step"] for r in rows if r.get("kind") == "train"]
    spacing = int(np.median(np.diff(train_steps))) if len(train_steps) > 1 else 1  # log_every_n_steps
    specs = [
        ("loss", "contrastive loss", "InfoNCE loss (nats)", math.log(batch_size) if batch_size else None, "ln B"),
        ("recall@1", "recall@1 across views", "recall@1", 1 / batch_size if batch_size else None, "1/B"),
        ("knn", "kNN accuracy of validation cells (k = 5)", "accuracy", None, None),
    ]
    panels = []
    for suffix, title, ylabel, chance, chance_name in specs:
        series = []
        train = [(r["step"], r[suffix]) for r in rows if r.get(suffix) is not None and r.get("kind") == "train"]
        if train:
            steps, values = (list(x) for x in zip(*train))
            window = max(5, len(values) // 20)
            series.append({"label": f"train {suffix}", "steps": steps, "values": values, "style": "raw"})
            series.append(
                {
                    "label": f"train {suffix}, moving average of {window} logged points (~{window * spacing} steps)",
                    "steps": steps,
                    "values": smoothed(values, window),
                    "style": "smooth",
                }
            )
        wanted = (lambda k: "/knn/" in k) if suffix == "knn" else (lambda k, s=suffix: k.endswith("/" + s))
        for key in sorted({k for r in rows for k in r if k.startswith("val/") and wanted(k)}):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            series.append({"label": key, "steps": [p[0] for p in pts], "values": [p[1] for p in pts], "style": "val"})
        if series:
            line = None if chance is None else {"value": chance, "label": f"chance ({chance_name}, B = {batch_size})"}
            panels.append({"title": title, "ylabel": ylabel, "series": series, "chance": line})
    return panels


def plot_curves(metrics_path: Path, out_png: Path, batch_size: int | None = None) -> Path | None:
    """curves.png from metrics.jsonl (`curve_panels`): loss, recall@1 and kNN accuracy against the
    optimizer step, with chance lines for a global batch of `batch_size` cells and the legends
    under the plots, clear of the data."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_panels(read_rows(metrics_path), batch_size)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 5.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        colour = None
        for series in panel["series"]:
            if series["style"] == "raw":
                (line,) = ax.plot(series["steps"], series["values"], alpha=0.25, linewidth=0.8, label=series["label"])
                colour = line.get_color()
            elif series["style"] == "smooth":
                ax.plot(series["steps"], series["values"], color=colour, linewidth=1.8, label=series["label"])
            else:
                ax.plot(series["steps"], series["values"], marker="o", markersize=3, label=series["label"])
        if panel["chance"] is not None:
            chance = panel["chance"]
            ax.axhline(chance["value"], color="grey", linestyle="--", linewidth=1, label=chance["label"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_png
