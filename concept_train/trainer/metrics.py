"""Where metrics go: the console, `metrics.jsonl` in the run directory, wandb when enabled, and a
PNG of the loss and recall curves at the end of the run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from concept_config.training import WandbKeys


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
            import wandb

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
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k in ("loss", "lr", "recall@1", "cells_per_s", "tokens_per_s", "mfu")
            or k.startswith("val/")
            and (k.endswith("/loss") or k.endswith("recall@1") or k.endswith("knn/cell_type"))
        )
        self.log(f"[train] {progress} {shown}")

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


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss and recall@1 against step, training and validation, from metrics.jsonl. Training points
    are drawn faintly with their moving average (a window of 1/20 of the run, at least 5 steps)
    over them: per-file batches make single steps noisy, the average shows the trend."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, suffix, title in ((axes[0], "loss", "loss"), (axes[1], "recall@1", "recall@1 across views")):
        train = [(r["step"], r[suffix]) for r in rows if r.get(suffix) is not None and r.get("kind") == "train"]
        if train:
            steps, values = zip(*train)
            raw = ax.plot(steps, values, alpha=0.25, linewidth=0.8, label=f"train {suffix}")[0]
            window = max(5, len(values) // 20)
            ax.plot(
                steps,
                smoothed(values, window),
                color=raw.get_color(),
                linewidth=1.8,
                label=f"train {suffix}, moving average ({window} steps)",
            )
        for key in sorted({k for r in rows for k in r if k.startswith("val/") and k.endswith("/" + suffix)}):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
