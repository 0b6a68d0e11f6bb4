"""Writing an experiment's report: NAME.md (tables), NAME.png (figure), NAME.json (numbers).

The three files are rendered in memory first and then each is written to a temporary file in
the output folder and moved into place (`os.replace`), so an experiment that fails never leaves
a half-written report. `check_out` refuses, before any work, to replace an earlier report
without `overwrite`.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.atomic import write_bytes
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

SUFFIXES = (".md", ".png", ".json")

# a table column: (row key, header, formatter)
Column = tuple[str, str, Callable[[Any], str]]


def check_out(out: Path, name: str, *, overwrite: bool) -> None:
    """Refuse an `out` that is a file, or that holds a report `name` already (unless
    `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    existing = [out / f"{name}{s}" for s in SUFFIXES if (out / f"{name}{s}").exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace the report")


def fixed(digits: int) -> Callable[[Any], str]:
    """Formatter: a number with `digits` decimals; "-" for None/NaN."""

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}"

    return fmt


def count(value: Any) -> str:
    """Formatter: 1234567 -> "1.23M", 12345 -> "12.3k"."""
    if value is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def plain(value: Any) -> str:
    """Formatter: str(value); "-" for None."""
    return "-" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table of `rows`, one line per row."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def settings_markdown(settings: dict[str, Any]) -> str:
    """A bullet list of the shared settings (scene options collapsed to one line)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """The PNG bytes of a matplotlib figure (which is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_report(out: Path, name: str, *, markdown: str, data: dict[str, Any],
                 png: bytes) -> dict[str, str]:
    """Write `out/name.{md,png,json}` (each atomically); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    contents = {".md": markdown.rstrip() + "\n", ".png": png, ".json": text}
    paths = {}
    for suffix, content in contents.items():
        path = out / f"{name}{suffix}"
        write_bytes(path, content.encode() if isinstance(content, str) else content)
        paths[suffix[1:]] = str(path)
    logger.info("wrote %s", ", ".join(paths.values()))
    return paths


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_examples(fig: Any, slot: Any, examples: dict[str, list[dict[str, np.ndarray]]],
                  class_names: Sequence[str], *, captions: dict[str, str] | None = None,
                  class_colors: Sequence[Sequence[int]] | None = None) -> None:
    """A grid in `slot` (a gridspec cell): one row per example image, columns image, ground
    truth, then each variant's prediction (`examples[variant][row]["pred"]`), with a class
    legend below (`class_colors`: the dataset's, else the default palette). Every variant must
    hold the same example images."""
    from matplotlib.patches import Patch

    from pixelwise.viz import IGNORE_COLOR, class_palette, colorize_labels

    palette = class_palette(len(class_names), class_colors)
    variants = list(examples)
    rows = len(examples[variants[0]]) if variants else 0
    if rows == 0:
        return
    columns = ["image", "ground truth", *variants]
    grid = slot.subgridspec(rows, len(columns), wspace=0.04, hspace=0.04)
    first = examples[variants[0]]
    for r in range(rows):
        panels = [first[r]["image"], colorize_labels(first[r]["target"], palette)]
        panels += [colorize_labels(examples[v][r]["pred"], palette) for v in variants]
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                title = columns[c]
                if captions and columns[c] in captions:
                    title += "\n" + captions[columns[c]]
                ax.set_title(title, fontsize=8)
    handles = [Patch(color=np.asarray(palette[i]) / 255, label=name)
               for i, name in enumerate(class_names)]
    handles.append(Patch(color=np.asarray(IGNORE_COLOR) / 255, label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)


def grouped_bars(ax: Any, rows: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str]], *,
                 ylim: tuple[float, float] = (0.0, 1.0)) -> None:
    """Bars of `metrics` ((row key, label) pairs) per row, grouped by row name, with values."""
    n, k = len(rows), len(metrics)
    width = 0.8 / max(k, 1)
    for j, (key, label) in enumerate(metrics):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(xs, values, width=width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(list(range(n)), [r["name"] for r in rows], fontsize=9)
    ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, frameon=False)
