"""The training curves of a run as a PNG (matplotlib, Agg backend): train loss terms, validation
metrics and learning rate against epochs, read from `RUN/metrics.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pixelwise.atomic import atomic_path

# nested metric groups that are tables, not curves
_SKIP = {"per_class", "per_category", "per_class_pq"}
# of a nested group (COCO's bbox / segm / keypoints, panoptic's all / things / stuff), the
# figures drawn: the other dozen COCO stats and the segment counts would bury them
_HEADLINE = ("AP", "AP50", "pq")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file (one JSON object per line; blank lines skipped)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def scalar_series(records: list[dict[str, Any]], group: str
                  ) -> dict[str, list[tuple[float, float]]]:
    """`{name: [(epoch, value), ...]}` for every number in `record[group]` (one nesting level is
    flattened as `outer/inner`; per-class tables and missing values are skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, x: float, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            series.setdefault(name, []).append((x, float(value)))

    for record in records:
        x = float(record.get("epoch", 0.0))
        for name, value in (record.get(group) or {}).items():
            if name in _SKIP:
                continue
            if isinstance(value, dict):
                for inner, inner_value in value.items():
                    if inner not in _SKIP:
                        add(f"{name}/{inner}", x, inner_value)
            else:
                add(name, x, value)
    return series


def validation_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """The validation curves drawn: every top-level number (semantic: miou, accuracies, dice),
    of nested groups only `_HEADLINE` (e.g. segm/AP, segm/AP50, things/pq), and no top-level
    series that repeats a nested one (segm_AP = segm/AP, pq = all/pq)."""
    series = scalar_series(records, "val")
    nested = [points for name, points in series.items() if "/" in name]
    return {name: points for name, points in series.items()
            if (name.split("/", 1)[1] in _HEADLINE if "/" in name else points not in nested)}


def plot_curves(records: list[dict[str, Any]], out: str | os.PathLike, title: str = "") -> Path:
    """Write the curves PNG to `out` atomically (temporary file, then `os.replace`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    train = scalar_series(records, "train")
    val = validation_series(records)
    lr = [(float(r.get("epoch", 0.0)), float(r["lr"])) for r in records if "lr" in r]

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0))
    ax = axes[0]
    terms = [name for name in train if name != "loss"]
    for name, points in train.items():
        total = name == "loss"
        if len(terms) == 1 and not total:
            continue  # one term: the total is that term
        xs, ys = zip(*points)
        label = (f"total ({terms[0]})" if len(terms) == 1 else "total") if total else name
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.2 if total else 1.2,
                label=label, color="black" if total else None)
    ax.set_title("training loss (epoch mean)")
    ax.set_xlabel("epoch")
    if train:
        values = [y for pts in train.values() for _, y in pts]
        if min(values) > 0 and max(values) / min(values) > 20:  # a log axis only when it helps
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for name, points in val.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.2 if name == "miou" else 1.2,
                label=f"{name} (last {ys[-1]:.3f}, best {max(ys):.3f})")
    ax.set_title("validation")
    ax.set_xlabel("epoch")
    if val:
        values = [y for pts in val.values() for _, y in pts]
        if 0.0 <= min(values) and max(values) <= 1.0:
            ax.set_ylim(0.0, 1.0)
        # below the axes: metric curves fill the whole [0, 1] range, a legend inside hides them
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no validation data", ha="center", va="center", transform=ax.transAxes)

    ax = axes[2]
    if lr:
        xs, ys = zip(*lr)
        ax.plot(xs, ys, marker="o", markersize=3)
    ax.grid(alpha=0.3)
    ax.set_title("learning rate (at record)")
    ax.set_xlabel("epoch")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.27, top=0.86 if title else 0.91,
                        wspace=0.25)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out
