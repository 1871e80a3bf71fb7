# Copyright 2024 The CLIP-RC authors and the clip-rc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The demo's comparison figure: validation images, their truth, both CLIP-RC runs side by side, and per-class IoU.

[`comparison_figure`] draws one PNG (needs `matplotlib`, the `plots` extra):

- one row per validation image, columns image | ground truth | CLIP-RC from the caption-trained CLIP | CLIP-RC from
  the control CLIP, one colour per class (a legend on top, unseen classes marked), background grey (it is labelled
  ignore and not scored, so the predictions are shown on the labelled pixels only);
- below, the per-class IoU of both runs as grouped bars, seen classes then unseen classes.

[`pick_rows`] chooses the validation images: those that show the unseen classes best.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_path


__all__ = ["CLASS_COLOURS", "FIGURE_DPI", "comparison_figure", "figure_size", "pick_rows"]

# Distinct colours for up to 12 classes (matplotlib's tab10 plus navy and lime), unrelated to the objects' own hues
# so that a confusion between two classes of the same hue is still visible.
CLASS_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#000080", "#7fff00",
)  # fmt: skip
BACKGROUND_COLOUR = "#d9d9d9"
BAR_COLOURS = ("#303030", "#a8a8a8")  # neutral, so the bars are not read as classes
FIGURE_DPI = 100
CELL_INCHES = 2.0  # side of one image cell
BARS_INCHES = 3.0  # height of the IoU chart
LEGEND_INCHES = 0.9  # height of the class legend and the column titles (two lines)


def figure_size(num_rows: int) -> tuple[int, int]:
    """`(width, height)` in pixels of the figure with `num_rows` image rows."""
    width = 4 * CELL_INCHES + 0.6
    height = num_rows * CELL_INCHES + BARS_INCHES + LEGEND_INCHES + 0.6
    return round(width * FIGURE_DPI), round(height * FIGURE_DPI)


def pick_rows(truths: Sequence[np.ndarray], unseen_class_ids: Sequence[int], num_rows: int) -> list[int]:
    """
    Indices of `num_rows` label maps to show: greedily, the one adding the most pixels of unseen classes not yet
    shown (so each unseen class appears if the split has it), ties broken by the number of classes in the image,
    then by index (deterministic).
    """
    unseen = list(unseen_class_ids)
    counts = np.stack([np.bincount(t.ravel(), minlength=256)[unseen] for t in truths])  # (images, unseen)
    num_classes = [len(set(np.unique(t).tolist()) - {255}) for t in truths]
    chosen: list[int] = []
    shown = np.zeros(len(unseen), dtype=bool)
    for _ in range(min(num_rows, len(truths))):
        candidates = [i for i in range(len(truths)) if i not in chosen]
        new_pixels = counts[:, ~shown].sum(1) if not shown.all() else counts.sum(1)
        gain = [(new_pixels[i], num_classes[i], -i) for i in candidates]
        best = candidates[max(range(len(candidates)), key=lambda k: gain[k])]
        chosen.append(best)
        shown |= counts[best] > 0
    return chosen


def _colour_table(num_classes: int) -> np.ndarray:
    """`(256, 3)` float RGB: class `k` -> its colour, every other id (255 = ignore) -> the background grey."""
    from matplotlib.colors import to_rgb

    if num_classes > len(CLASS_COLOURS):
        raise ValueError(f"The comparison figure has colours for {len(CLASS_COLOURS)} classes, got {num_classes}.")
    table = np.tile(np.asarray(to_rgb(BACKGROUND_COLOUR)), (256, 1))
    table[:num_classes] = [to_rgb(colour) for colour in CLASS_COLOURS[:num_classes]]
    return table


def _draw_rows(figure, grid, images, truths, predictions, columns, table, ignore_index):
    for row, (image, truth) in enumerate(zip(images, truths)):
        labelled = truth != ignore_index
        panels = [np.asarray(image), table[truth]]
        panels += [table[np.where(labelled, prediction[row], ignore_index)] for prediction in predictions.values()]
        for column, panel in enumerate(panels):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(panel, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(columns[column], fontsize=9)


def _draw_iou_bars(axes, per_class_iou, class_names, unseen_class_ids):
    seen = [k for k in range(len(class_names)) if k not in unseen_class_ids]
    order = seen + list(unseen_class_ids)
    # a one-bar gap between the seen and the unseen group
    positions = np.array([i + (i >= len(seen)) for i in range(len(order))], dtype=float)
    width = 0.8 / len(per_class_iou)
    for index, (run, ious) in enumerate(per_class_iou.items()):
        values = 100 * np.nan_to_num(np.asarray(ious, dtype=float)[order])
        seen_mean, unseen_mean = values[: len(seen)].mean(), values[len(seen) :].mean()
        label = f"{run} (mIoU seen {seen_mean:.1f}, unseen {unseen_mean:.1f})"
        offset = (index - (len(per_class_iou) - 1) / 2) * width
        axes.bar(positions + offset, values, width, label=label, color=BAR_COLOURS[index % len(BAR_COLOURS)])
    axes.axvspan(len(seen) + 0.5, positions[-1] + 0.6, color="#fff2cc", zorder=0)
    axes.text(len(seen) / 2 - 0.5, 104, "seen classes (trained with masks)", ha="center", fontsize=8)
    axes.text(positions[len(seen) + 1], 104, "unseen (names only)", ha="center", fontsize=8)
    axes.set_xticks(positions)
    axes.set_xticklabels([class_names[k] for k in order], fontsize=8)
    for tick, class_id in zip(axes.get_xticklabels(), order):
        tick.set_fontweight("bold" if class_id in unseen_class_ids else "normal")
    axes.set_ylim(0, 112)
    axes.set_xlim(-0.6, positions[-1] + 0.6)
    axes.set_ylabel("IoU (%)", fontsize=8)
    axes.tick_params(axis="y", labelsize=8)
    axes.legend(fontsize=8, loc="lower left", framealpha=0.9)


def comparison_figure(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    per_class_iou: Mapping[str, Sequence[float]],
    class_names: Sequence[str],
    unseen_class_ids: Sequence[int],
    ignore_index: int = 255,
) -> Path:
    """
    Draw the comparison figure (see the module docstring) and save it as a PNG of [`figure_size`]`(len(images))`.

    Args:
        path: the PNG to write (atomically, see [`~clip_rc.utils.atomic_path`]).
        images: `(H, W, 3)` uint8 RGB validation images, one per row.
        truths: their `(H, W)` label maps (class ids, `ignore_index` elsewhere).
        predictions: run name -> one `(H, W)` predicted label map per image (two runs: two columns).
        per_class_iou: run name -> IoU of every class (fractions in 0..1, NaN for a class absent from the split).
        class_names: the class names in id order.
        unseen_class_ids: the ids of the classes no mask was shown of.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    table = _colour_table(len(class_names))
    width, height = figure_size(len(images))
    figure = plt.figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    try:
        top = 1 - LEGEND_INCHES * FIGURE_DPI / height
        grid = figure.add_gridspec(
            len(images) + 1, 4, height_ratios=[CELL_INCHES] * len(images) + [BARS_INCHES - 0.5],
            left=0.07, right=0.97, top=top, bottom=0.45 * FIGURE_DPI / height, hspace=0.08, wspace=0.05,
        )  # fmt: skip
        columns = ["image", "ground truth"] + [f"CLIP-RC {run}" for run in predictions]
        _draw_rows(figure, grid, images, truths, predictions, columns, table, ignore_index)
        _draw_iou_bars(figure.add_subplot(grid[len(images), :]), per_class_iou, class_names, unseen_class_ids)
        handles = [
            Patch(color=CLASS_COLOURS[k], label=f"{name} (unseen)" if k in unseen_class_ids else name)
            for k, name in enumerate(class_names)
        ]
        handles.append(Patch(color=BACKGROUND_COLOUR, label="background (not scored)"))
        figure.legend(handles=handles, loc="upper center", ncol=7, fontsize=8, frameon=False)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=FIGURE_DPI)
    finally:
        plt.close(figure)
    return Path(path)
