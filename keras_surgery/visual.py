"""Pictures of a surgery: each changed weight as a map of its copied, zeroed and fresh regions.

`region_map` reduces a weight to a 2-D grid over its last two axes (a 1-D weight is one row;
kernel taps of convolutions are folded into their channel cells), coarsened to at most
`max_cells` per side. `to_html` writes one self-contained page (inline SVG, no scripts, no
dependencies); `plot` draws the same maps with matplotlib (an optional dependency).
"""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING

import numpy as np

from keras_surgery.atomic import atomic_path, write_text
from keras_surgery.feature_changes import describe_changes
from keras_surgery.fill import regions_of

if TYPE_CHECKING:
    from keras_surgery.plan import SurgeryPlan, WeightPlan

FRESH, ZEROED, COPIED = 0, 1, 2
COLORS = {COPIED: "#2b8cbe", ZEROED: "#d9d9d9", FRESH: "#fdae6b"}
NAMES = {COPIED: "copied", ZEROED: "zeroed", FRESH: "fresh"}


def region_map(wp: WeightPlan, policy: str, max_cells: int = 64) -> np.ndarray:
    """A small int grid (FRESH/ZEROED/COPIED) of one weight's regions over its last two axes,
    from the regions the fill kernel writes (`keras_surgery.fill.regions_of`)."""
    shape = wp.shape if wp.shape else (1,)
    if wp.axes is None or not wp.axes:  # a scalar with a map (a count) is copied whole
        grid = np.full(shape[-2:] if len(shape) > 1 else (1, shape[-1]),
                       COPIED if wp.axes is not None else FRESH)
        return _coarsen(grid, max_cells)
    copy_masks, zero_masks = regions_of(wp, policy).masks(wp.shape)
    # An earlier axis (a conv tap) that is partly copied or zeroed makes the folded cells
    # partial: a cell shows a state only where every earlier axis has it entirely.
    earlier_copy = all(m.all() for m in copy_masks[:-2])
    earlier_zero = all(m.all() for m in zero_masks[:-2])
    copy_masks, zero_masks = copy_masks[-2:], zero_masks[-2:]
    if len(copy_masks) == 1:
        copy_masks = [np.ones(1, bool)] + copy_masks
        zero_masks = [np.ones(1, bool)] + zero_masks
    copy = np.outer(copy_masks[0], copy_masks[1]) & earlier_copy
    zero = np.outer(zero_masks[0], zero_masks[1]) & earlier_zero & ~copy
    grid = np.full(copy.shape, FRESH)
    grid[zero] = ZEROED
    grid[copy] = COPIED
    return _coarsen(grid, max_cells)


def _coarsen(grid: np.ndarray, max_cells: int) -> np.ndarray:
    rows = np.array_split(np.arange(grid.shape[0]), min(grid.shape[0], max_cells))
    cols = np.array_split(np.arange(grid.shape[1]), min(grid.shape[1], max_cells))
    # a coarse cell shows the least preserved state inside it (fresh < zeroed < copied)
    return np.array([[grid[np.ix_(r, c)].min() for c in cols] for r in rows])


def changed_weights(plan: SurgeryPlan) -> list[WeightPlan]:
    return [w for w in plan.weights if w.status != "copied"]


def _svg(grid: np.ndarray, cell: int = 6) -> str:
    h, w = grid.shape
    rects = [
        f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
        f'fill="{COLORS[int(grid[i, j])]}"/>'
        for i in range(h) for j in range(w)
    ]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cell}" height="{h * cell}">'
            + "".join(rects) + "</svg>")


def to_html(plan: SurgeryPlan, path: str | os.PathLike, warnings: list[str] | None = None) -> str:
    """Writes one self-contained HTML page of the surgery; returns its path."""
    warnings = plan.warnings if warnings is None else warnings
    totals = plan.totals()
    legend = " ".join(
        f'<span style="background:{COLORS[k]};padding:0 .5em">{NAMES[k]}</span>'
        for k in (COPIED, ZEROED, FRESH)
    )
    rows = []
    for w in plan.weights:
        picture = _svg(region_map(w, plan.policy, max_cells=32)) if w.status != "copied" else ""
        rows.append(
            f"<tr><td>{html.escape(w.layer)}</td><td>{html.escape(w.role)}</td>"
            f"<td>{'x'.join(map(str, w.shape))}</td><td>{w.status}</td><td>{w.copied}</td>"
            f"<td>{w.zeroed}</td><td>{w.fresh}</td><td>{picture}</td></tr>"
        )
    items = "".join(f"<li>{html.escape(x)}</li>" for x in warnings) or "<li>none</li>"
    features = "".join(f"<li>{html.escape(x)}</li>" for x in describe_changes(plan.features)
                       ) or "<li>none</li>"
    dropped = "".join(f"<li>{html.escape(x)}</li>" for x in plan.dropped) or "<li>none</li>"
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>keras-surgery report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}}</style></head><body>
<h1>Surgery {html.escape(plan.old)} &rarr; {html.escape(plan.new)}</h1>
<p>policy <b>{plan.policy}</b>; preserves_function: <b>{plan.preserves_function}</b>;
{totals['copied']} copied, {totals['zeroed']} zeroed, {totals['fresh']} fresh entries.</p>
<p>Maps show each changed weight over its last two axes (rows: second to last): {legend}</p>
<table><tr><th>layer</th><th>weight</th><th>shape</th><th>status</th><th>copied</th>
<th>zeroed</th><th>fresh</th><th>regions</th></tr>{''.join(rows)}</table>
<h2>Features</h2><ul>{features}</ul>
<h2>Warnings</h2><ul>{items}</ul>
<h2>Old weights dropped</h2><ul>{dropped}</ul>
</body></html>
"""
    path = os.fspath(path)
    write_text(path, page)
    return path


def plot(plan: SurgeryPlan, path: str | os.PathLike, max_weights: int = 24) -> str:
    """Draws the region maps of the changed weights into an image file (needs matplotlib)."""
    try:
        # The object-oriented API: no pyplot state, no backend switch in the user's session.
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "report.plot needs matplotlib: pip install 'keras-surgery[plot]'"
        ) from exc
    weights = changed_weights(plan)[:max_weights] or plan.weights[:1]
    cols = min(4, len(weights))
    rows = (len(weights) + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = ListedColormap([COLORS[FRESH], COLORS[ZEROED], COLORS[COPIED]])
    for ax, w in zip(axes.flat, weights):
        ax.imshow(region_map(w, plan.policy), cmap=cmap, vmin=0, vmax=2, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{w.layer}/{w.role}\n{'x'.join(map(str, w.shape))}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(weights):]:
        ax.axis("off")
    fig.suptitle("copied (blue), zeroed (grey), fresh (orange)", fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
    return path
