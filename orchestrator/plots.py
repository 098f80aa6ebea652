"""Figures logged with MLflow runs: SEA mIoU against ε, example predictions, and a sweep's curves.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot global state), so the
driver can draw them from any thread and without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from data.classes import IGNORE_INDEX, VOC_PALETTE
from trainables.units import eps_label

WORST = "worst"
CLEAN = "clean"


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas, independent of pyplot, laid out without overlaps."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write a figure as PNG and return the path."""
    path = Path(path)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def sea_curve(sea: Mapping[float, Mapping[str, Mapping[str, float]]], clean_miou: float | None = None,
              title: str = "") -> Figure:
    """SEA mIoU against ε (1/255 units): the worst case and each loss, with the clean score as ε = 0.

    `sea` maps ε -> {"clean": {...}, "worst": {...}, "<loss>": {...}} as `trainables.attacks.aggregate`
    returns it; mIoU values are fractions in [0, 1]. The clean point comes from the SEA images'
    clean scores when present, else from `clean_miou`.
    """
    eps = sorted(float(e) for e in sea)
    if not eps:
        raise ValueError("sea_curve: no ε given")
    first = sea[_key(sea, eps[0])]
    clean = first.get(CLEAN, {}).get("miou", clean_miou)
    names = [WORST] + sorted(k for k in first if k not in (WORST, CLEAN))
    figure = new_figure(5.5, 4.0)
    axes = figure.add_subplot()
    plotted: list[float] = []
    for name in names:
        xs, ys = ([0.0], [clean]) if clean is not None else ([], [])
        xs += eps
        ys += [sea[_key(sea, e)][name]["miou"] for e in eps]
        plotted += ys
        style = {"linewidth": 2.5, "color": "black", "marker": "o", "zorder": 3} if name == WORST else {"marker": "."}
        axes.plot(xs, ys, label="SEA (worst case)" if name == WORST else name, **style)
    axes.set_xlabel("ε (×1/255)")
    axes.set_ylabel("mIoU (fraction)")
    axes.set_ylim(0.0, max([1e-3] + [min(1.0, 1.1 * v) for v in _finite(plotted)]))
    axes.set_xticks([0.0] + eps, ["0"] + [eps_label(e) for e in eps])
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title or "SEA mIoU against ε")
    return figure


def sweep_curves(rows: Sequence[Mapping[str, object]], eps: Sequence[float]) -> Figure:
    """One SEA mIoU-against-ε curve per trial of a sweep (the parent run's plot); ε = 0 is the clean mIoU
    on the SEA images (`sea_clean_miou_eps{E}`), else on the validation set (`clean_miou`)."""
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    eps = sorted(float(e) for e in eps)
    for row in rows:
        xs, ys = [], []
        clean_key = next((f"sea_clean_miou_eps{eps_label(e)}" for e in eps
                          if f"sea_clean_miou_eps{eps_label(e)}" in row), "clean_miou")
        for x, key in [(0.0, clean_key)] + [(e, f"sea_miou_eps{eps_label(e)}") for e in eps]:
            value = row.get(key)
            if isinstance(value, (int, float)):
                xs.append(x)
                ys.append(float(value))
        if xs:
            axes.plot(xs, ys, marker="o", label=str(row.get("trial_name", row.get("run_id", "?"))))
    axes.set_xlabel("ε (×1/255)")
    axes.set_ylabel("SEA mIoU (fraction)")
    axes.set_xticks([0.0] + eps, ["0"] + [eps_label(e) for e in eps])
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    axes.set_title("SEA mIoU per trial")
    return figure


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]] = VOC_PALETTE) -> np.ndarray:
    """H×W class indices -> H×W×3 uint8 colours; IGNORE_INDEX is drawn in VOC's neutral 'void' colour."""
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"labels must be H×W integer class indices, got shape {label.shape} dtype {label.dtype}")
    table = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    table[: len(colours)] = colours
    table[IGNORE_INDEX] = VOC_PALETTE[IGNORE_INDEX]
    valid = label == IGNORE_INDEX
    bad = (~valid) & ((label < 0) | (label >= len(colours)))
    if bad.any():
        raise ValueError(f"label values {sorted(set(np.unique(label[bad]).tolist()))[:5]} have no colour "
                         f"in a palette of {len(colours)} entries (and are not ignore = {IGNORE_INDEX})")
    return table[label.astype(np.int64)]


def to_hwc_uint8(images: np.ndarray) -> np.ndarray:
    """Images as N×H×W×3 uint8, from N×3×H×W floats in [0, 1] or N×H×W×3 uint8 (anything else is an error)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.dtype == np.uint8 and images.shape[-1] == 3:
        return images
    if images.ndim == 4 and np.issubdtype(images.dtype, np.floating) and images.shape[1] == 3:
        low, high = float(np.nanmin(images)), float(np.nanmax(images))
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"float images must be in [0, 1] (un-normalised), got values in [{low:.3g}, {high:.3g}]")
        return (np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"images must be N×3×H×W floats in [0, 1] or N×H×W×3 uint8, "
                     f"got shape {images.shape} dtype {images.dtype}")


def example_grid(images: np.ndarray, labels: np.ndarray, clean_pred: np.ndarray, adv_pred: np.ndarray, *,
                 palette: Sequence[Sequence[int]] = VOC_PALETTE, eps: float | None = None,
                 class_names: Sequence[str] | None = None) -> Figure:
    """A grid with one row per image: image, ground truth, clean prediction, adversarial prediction.

    `images`: N×3×H×W floats in [0, 1] or N×H×W×3 uint8; `labels`, `clean_pred`, `adv_pred`: N×H×W
    integer class indices, IGNORE_INDEX (255) marks ignored pixels. With `class_names`, a legend
    names the classes that appear.
    """
    rgb = to_hwc_uint8(images)
    maps = [np.asarray(a) for a in (labels, clean_pred, adv_pred)]
    for name, array in zip(("labels", "clean_pred", "adv_pred"), maps, strict=True):
        if array.shape != rgb.shape[:3]:
            raise ValueError(f"{name} must be N×H×W = {rgb.shape[:3]} like the images, got {array.shape}")
    n = rgb.shape[0]
    if n == 0:
        raise ValueError("example_grid: no images given")
    adv_title = f"adversarial (ε={eps_label(eps)}/255)" if eps is not None else "adversarial"
    titles = ("image", "ground truth", "clean prediction", adv_title)
    height, width = rgb.shape[1:3]
    cell = 2.6
    figure = new_figure(4 * cell, n * cell * height / width + (0.6 if class_names else 0.2))
    for i in range(n):
        panels = [rgb[i]] + [colorize(m[i], palette) for m in maps]
        for j, panel in enumerate(panels):
            axes = figure.add_subplot(n, 4, i * 4 + j + 1)
            axes.imshow(panel, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if i == 0:
                axes.set_title(titles[j], fontsize="small")
    if class_names:
        present = sorted(set(np.unique(np.concatenate([m.ravel() for m in maps])).tolist()) - {IGNORE_INDEX})
        colours = np.asarray(palette, dtype=float).reshape(-1, 3) / 255.0
        handles = [Patch(color=colours[c], label=class_names[c] if c < len(class_names) else str(c))
                   for c in present if c < len(colours)]
        handles.append(Patch(color=np.asarray(VOC_PALETTE[IGNORE_INDEX]) / 255.0, label="ignored"))
        figure.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize="small")
    return figure


def _key(sea: Mapping[float, object], eps: float):
    """The key of `sea` equal to ε as a float (callers may use ints or floats)."""
    for key in sea:
        if float(key) == eps:
            return key
    raise KeyError(eps)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]
