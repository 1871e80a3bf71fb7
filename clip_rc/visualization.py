"""Pictures of label maps: class palettes, coloured maps, overlays with a legend, paletted PNG files."""

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from .class_sets import BENCHMARKS, get_benchmark


__all__ = [
    "class_palette",
    "colorize_label_map",
    "draw_legend",
    "overlay_label_map",
    "save_iou_plot",
    "save_label_map",
]


def _generated_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours: hues spaced by the golden ratio, alternating saturation and value."""
    colours = []
    for index in range(num_classes):
        hue = (index * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6)[index % 2]
        value = (0.95, 0.75, 0.55)[(index // 2) % 3]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((int(red * 255), int(green * 255), int(blue * 255)))
    return colours


def class_palette(class_names: Sequence[str], benchmark: str | None = None) -> list[tuple[int, int, int]]:
    """
    One RGB colour per class: the benchmark's palette when `class_names` are exactly that benchmark's classes (the
    named `benchmark`, or any known benchmark with these names), generated distinct colours otherwise.
    """
    names = tuple(class_names)
    candidates = [benchmark] if benchmark in BENCHMARKS else []
    candidates += [name for name in BENCHMARKS if name not in candidates]
    for name in candidates:
        known = get_benchmark(name)
        if known.class_names == names:
            return [tuple(colour) for colour in known.palette]
    return _generated_palette(len(names))


def colorize_label_map(label_map: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]]) -> PIL.Image.Image:
    """RGB image of a `(H, W)` label map; ids outside the palette (e.g. 255 = ignore) are black."""
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    table = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return PIL.Image.fromarray(table[labels.astype(np.int64)])


def save_label_map(label_map: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]], path: str | os.PathLike):
    """
    Save a label map as a PNG whose pixel values are the class indices: paletted (mode "P", the class colours) for
    up to 256 classes, 16-bit grayscale beyond.
    """
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if labels.size and labels.max() > 255:
        PIL.Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    image = PIL.Image.fromarray(labels.astype(np.uint8))
    flat = [channel for colour in palette[:256] for channel in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))  # an "L" image becomes "P" with the same values
    image.save(path)


def draw_legend(
    image: PIL.Image.Image, entries: Sequence[tuple[str, Sequence[int]]], margin: int = 4
) -> PIL.Image.Image:
    """
    Draw a legend (one colour swatch and class name per entry) on a dark translucent box in the top-left corner of
    `image`, in place; rows that do not fit the image are left out. Returns `image`.
    """
    if not entries:
        return image
    font = PIL.ImageFont.load_default()
    draw = PIL.ImageDraw.Draw(image, "RGBA")
    text_boxes = [draw.textbbox((0, 0), name, font=font) for name, _ in entries]
    row_height = max(box[3] for box in text_boxes) + 2
    swatch = row_height - 2
    width = margin * 3 + swatch + max(box[2] for box in text_boxes)
    fitting = max(1, min(len(entries), (image.height - margin) // (row_height + 1)))
    height = margin * 2 + fitting * (row_height + 1)
    draw.rectangle((0, 0, width, height), fill=(0, 0, 0, 150))
    for row, (name, colour) in enumerate(entries[:fitting]):
        top = margin + row * (row_height + 1)
        draw.rectangle(
            (margin, top, margin + swatch, top + swatch), fill=tuple(int(c) for c in colour), outline=(255, 255, 255)
        )
        draw.text((margin * 2 + swatch, top), name, fill=(255, 255, 255), font=font)
    return image


def overlay_label_map(
    image: PIL.Image.Image,
    label_map: np.ndarray | torch.Tensor,
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> PIL.Image.Image:
    """
    The image blended (`alpha`) with the colours of its label map, same size as the image. With `class_names`, a
    legend of the classes present (most frequent first) is drawn in the top-left corner.
    """
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    colours = colorize_label_map(labels, palette)
    overlay = PIL.Image.blend(image.convert("RGB"), colours, alpha)
    if class_names is not None:
        ids, counts = np.unique(labels, return_counts=True)
        by_area = ids[np.argsort(-counts, kind="stable")]
        present = [int(class_id) for class_id in by_area if class_id < len(class_names)]
        draw_legend(overlay, [(class_names[class_id], palette[class_id]) for class_id in present])
    return overlay


def save_iou_plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Horizontal bar chart of the per-class IoU (seen classes blue, unseen orange), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["class_names"])
    ious = np.nan_to_num(np.asarray(results["per_category_iou"], dtype=np.float64), nan=0.0) * 100
    unseen = set(results["unseen_class_ids"])
    colours = ["tab:orange" if class_id in unseen else "tab:blue" for class_id in range(len(names))]
    figure, axes = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1)))
    axes.barh(range(len(names)), ious, color=colours)
    axes.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 40 else 9)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("IoU (%)")
    title = f"mIoU {100 * results['mean_iou']:.2f}" if results["mean_iou"] == results["mean_iou"] else "mIoU n/a"
    axes.set_title(title + " (blue: seen, orange: unseen)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
