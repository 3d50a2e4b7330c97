"""curves.png: the moving average that shows a noisy loss's trend, labelled with what it averages;
kNN drawn; y labels and chance lines."""

from __future__ import annotations

import json
import math

import numpy as np

from concept_train.trainer.metrics import curve_panels, plot_curves, smoothed


def test_moving_average_is_bias_corrected_and_follows_the_trend():
    np.testing.assert_allclose(smoothed([3.0, 3.0, 3.0], window=10), 3.0)  # no pull towards zero at the start
    rng = np.random.default_rng(0)
    trend = np.linspace(5, 1, 400)
    noisy = trend + rng.normal(0, 0.5, 400)
    ema = np.array(smoothed(noisy, window=20))
    assert np.abs(ema[50:] - trend[50:]).mean() < 0.5 * np.abs(noisy[50:] - trend[50:]).mean()
    assert smoothed([1.0, 2.0], window=1) == [1.0, 2.0]  # a window of one point is the raw curve


def test_curves_png_is_written_from_metrics_jsonl(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 5 - s / 100, "recall@1": s / 200} for s in range(1, 120)]
    rows += [{"kind": "val", "step": 60, "val/x/loss": 4.0, "val/x/recall@1": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", batch_size=64)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None


def test_panels_label_their_axes_draw_chance_and_knn_and_say_what_the_average_spans():
    """curves.png had no y labels and no chance lines, called 5 logged points "5 steps" (125 in
    the demo) and left out kNN, the walk-through's only validation metric."""
    rows = [{"kind": "train", "step": s, "loss": 4.0, "recall@1": 0.1} for s in range(25, 2501, 25)]
    rows += [{"kind": "val", "step": 500, "val/w/knn/cell_type": 0.9, "val/w/loss": 3.0}]
    loss, recall, knn = curve_panels(rows, batch_size=256)
    assert loss["ylabel"] == "InfoNCE loss (nats)" and loss["chance"]["value"] == math.log(256)
    assert recall["chance"]["value"] == 1 / 256 and recall["ylabel"] == "recall@1"
    assert loss["series"][1]["label"] == "train loss, moving average of 5 logged points (~125 steps)"
    assert [s["label"] for s in knn["series"]] == ["val/w/knn/cell_type"] and knn["chance"] is None
    assert "val/w/loss" in [s["label"] for s in loss["series"]]
