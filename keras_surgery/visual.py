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
from keras_surgery.fill import init_value, regions_of

if TYPE_CHECKING:
    from keras_surgery.plan import SurgeryPlan, WeightPlan

FRESH, ZEROED, COPIED, START = 0, 1, 2, 3
COLORS = {COPIED: "#2b8cbe", ZEROED: "#d9d9d9", FRESH: "#fdae6b", START: "#9e62c9"}
NAMES = {COPIED: "copied", ZEROED: "zeroed", FRESH: "fresh", START: "set by a start"}


def region_fractions(wp: WeightPlan, policy: str, max_cells: int = 64) -> np.ndarray:
    """Per cell of a weight's picture, the fraction of its entries in each state (the last
    axis: FRESH, ZEROED, COPIED, START), over the weight's last two axes (a 1-D weight is one
    row; earlier axes such as conv taps are folded into the cells), in at most `max_cells`
    blocks per side. From the regions the fill kernel writes (`keras_surgery.fill`), and for
    a new layer's start from its value (entries set to a non-zero value are START)."""
    shape = tuple(wp.shape) if wp.shape else (1,)
    rows, cols = (shape[-2], shape[-1]) if len(shape) > 1 else (1, shape[-1])
    folded = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
    counts = np.zeros((rows, cols, 4))
    if wp.init is not None:
        preset = (init_value(wp.init, shape) != 0).reshape(folded, rows, cols).sum(axis=0)
        counts[..., START], counts[..., ZEROED] = preset, folded - preset
    elif wp.axes is None:
        counts[..., FRESH] = folded
    elif not wp.axes:  # a scalar with a map (a count) is copied whole
        counts[..., COPIED] = 1
    else:
        regions = regions_of(wp, policy)
        copy_masks, zero_masks = (
            [m.astype(float) for m in masks] for masks in regions.masks(wp.shape))
        if len(copy_masks) == 1:
            copy_masks, zero_masks = [np.ones(1)] + copy_masks, [np.ones(1)] + zero_masks
        copied = np.prod([m.sum() for m in copy_masks[:-2]]) * np.outer(*copy_masks[-2:])
        zeroed = np.zeros_like(copied)
        if regions.zero is not None:  # the zero block holds the copy block
            zeroed = np.prod([m.sum() for m in zero_masks[:-2]]) * np.outer(*zero_masks[-2:])
            zeroed = zeroed - copied
        counts[..., COPIED], counts[..., ZEROED] = copied, zeroed
        counts[..., FRESH] = folded - copied - zeroed
    row_starts = [r[0] for r in np.array_split(np.arange(rows), min(rows, max_cells)) if len(r)]
    col_starts = [c[0] for c in np.array_split(np.arange(cols), min(cols, max_cells)) if len(c)]
    if not row_starts or not col_starts:
        return np.zeros((max(len(row_starts), 1), max(len(col_starts), 1), 4))
    blocks = np.add.reduceat(np.add.reduceat(counts, row_starts, axis=0), col_starts, axis=1)
    return blocks / blocks.sum(axis=-1, keepdims=True)


def region_map(wp: WeightPlan, policy: str, max_cells: int = 64) -> np.ndarray:
    """A small int grid of one weight's picture: each cell shows the state most of its entries
    are in (see `region_fractions`; on a tie, the least preserved)."""
    return np.argmax(region_fractions(wp, policy, max_cells), axis=-1)


def changed_weights(plan: SurgeryPlan) -> list[WeightPlan]:
    return [w for w in plan.weights if w.status != "copied"]


def _svg(fractions: np.ndarray, cell: int = 6) -> str:
    """The picture of one weight: a cell per block, in the color of its main state, with the
    share of every state in its tooltip."""
    grid = np.argmax(fractions, axis=-1)
    h, w = grid.shape
    rects = []
    for i in range(h):
        for j in range(w):
            shares = ", ".join(f"{NAMES[k]} {fractions[i, j, k]:.0%}" for k in NAMES
                               if fractions[i, j, k] > 0)
            rects.append(f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
                         f'fill="{COLORS[int(grid[i, j])]}"><title>{shares}</title></rect>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cell}" height="{h * cell}">'
            + "".join(rects) + "</svg>")


ALL_ROWS_UP_TO = 40
"""Plans with more weights list only the changed ones in the HTML table."""


def _weight_rows(plan: SurgeryPlan) -> str:
    shown = plan.weights if len(plan.weights) <= ALL_ROWS_UP_TO else changed_weights(plan)
    rows = []
    for w in shown:
        picture = (_svg(region_fractions(w, plan.policy, max_cells=32))
                   if w.status != "copied" else "")
        rows.append(
            f"<tr><td>{html.escape(w.layer)}</td><td>{html.escape(w.role)}</td>"
            f"<td>{'x'.join(map(str, w.shape))}</td><td>{w.status}</td><td>{w.copied}</td>"
            f"<td>{w.zeroed}</td><td>{w.fresh}</td><td>{picture}</td></tr>"
        )
    hidden = len(plan.weights) - len(shown)
    if hidden:
        rows.append(f'<tr><td colspan="8">{hidden} more weight(s) copied unchanged</td></tr>')
    return "".join(rows)


def _items(lines: list[str]) -> str:
    return "".join(f"<li>{html.escape(x)}</li>" for x in lines) or "<li>none</li>"


def to_html(plan: SurgeryPlan, path: str | os.PathLike, warnings: list[str] | None = None) -> str:
    """Writes one self-contained HTML page of the surgery (the verdict and the warnings first,
    then the features, every changed weight with a map of its regions, the dropped weights);
    returns its path."""
    warnings = plan.warnings if warnings is None else warnings
    totals = plan.totals()
    legend = " ".join(
        f'<span style="background:{COLORS[k]};padding:0 .5em">{NAMES[k]}</span>'
        for k in (COPIED, ZEROED, FRESH, START)
    )
    verdict = ("the new model computes the old function" if plan.preserves_function else
               "the old outputs change (the warnings say why)")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>keras-surgery report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}}</style></head><body>
<h1>Surgery {html.escape(plan.old)} &rarr; {html.escape(plan.new)}</h1>
<p>preserves_function: <b>{plan.preserves_function}</b>: {verdict}. Policy <b>{plan.policy}</b>;
{totals['copied']} copied, {totals['zeroed']} zeroed, {totals['fresh']} fresh,
{totals.get('preset', 0)} set by starts.</p>
<h2>Warnings</h2><ul>{_items(warnings)}</ul>
<h2>Features</h2><ul>{_items(describe_changes(plan.features))}</ul>
<h2>Weights</h2>
<p>Maps show each changed weight over its last two axes (rows: second to last), each cell in the
color of most of its entries (hover for the shares): {legend}</p>
<table><tr><th>layer</th><th>weight</th><th>shape</th><th>status</th><th>copied</th>
<th>zeroed</th><th>fresh</th><th>regions</th></tr>{_weight_rows(plan)}</table>
<h2>Old weights dropped</h2><ul>{_items(plan.dropped)}</ul>
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
    cmap = ListedColormap([COLORS[FRESH], COLORS[ZEROED], COLORS[COPIED], COLORS[START]])
    for ax, w in zip(axes.flat, weights):
        ax.imshow(region_map(w, plan.policy), cmap=cmap, vmin=0, vmax=3, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{w.layer}/{w.role}\n{'x'.join(map(str, w.shape))}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(weights):]:
        ax.axis("off")
    fig.suptitle(f"preserves_function={plan.preserves_function}: copied (blue), zeroed (grey), "
                 "fresh (orange), set by a start (purple)", fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
    return path
