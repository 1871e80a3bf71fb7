"""Colour-block segmentation data written by the tests (no downloads): a `save_to_disk` dataset and a PASCAL VOC tree.

Every image is a grid of rectangles; each rectangle shows one class in that class's own colour (plus a little
noise), so a model can learn the colour-to-class mapping in a few steps. (The shapes world of the demo is
[`clip_rc.toy.synthetic`].)
"""

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from clip_rc.class_sets import get_benchmark


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A distinct, fixed RGB colour per class id."""
    rng = np.random.default_rng(1000 + class_id)
    return tuple(int(value) for value in rng.integers(30, 226, size=3))


def draw_sample(
    rng: np.random.Generator, size: tuple[int, int], class_ids: list[int], ignore_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 image and its (H, W) uint8 class-id map (255 on a thin ignored border)."""
    height, width = size
    label = np.empty((height, width), dtype=np.uint8)
    rows, cols = rng.integers(1, 3), rng.integers(1, 3)
    row_edges = np.linspace(0, height, rows + 1).astype(int)
    col_edges = np.linspace(0, width, cols + 1).astype(int)
    for top, bottom in zip(row_edges[:-1], row_edges[1:]):
        for left, right in zip(col_edges[:-1], col_edges[1:]):
            label[top:bottom, left:right] = rng.choice(class_ids)
    palette = np.array([class_colour(class_id) for class_id in range(256)], dtype=np.float32)
    image = palette[label] + rng.normal(0, 8, size=(height, width, 3))
    border = max(1, int(round(ignore_fraction * min(height, width))))
    label[:border] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_segmentation_dataset(
    root: str | Path,
    num_train: int = 8,
    num_validation: int = 4,
    size: tuple[int, int] = (64, 64),
    class_ids: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """A `DatasetDict` (train / validation, columns `image` and `label`) saved with `save_to_disk` at `root`."""
    rng = np.random.default_rng(seed)
    class_ids = class_ids if class_ids is not None else [0, 1, 2]
    splits = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        images, labels = [], []
        for _ in range(count):
            image, label = draw_sample(rng, size, class_ids)
            images.append(Image.fromarray(image))
            labels.append(Image.fromarray(label))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    root = Path(root)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def _voc_palette() -> list[int]:
    """VOC's 256-colour palette layout: index 0 black, 255 white; the benchmark's colours for 1..20."""
    palette = [0, 0, 0] * 256
    for class_id, colour in enumerate(get_benchmark("voc").palette):
        palette[3 * (class_id + 1) : 3 * (class_id + 2)] = list(colour)
    palette[3 * 255 : 3 * 256] = [224, 224, 192]
    return palette


def make_voc_tree(
    root: str | Path,
    num_train: int = 4,
    num_val: int = 3,
    num_aug: int = 2,
    sizes: list[tuple[int, int]] | None = None,
    class_ids: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """
    A PASCAL VOC 2012 tree (`root/VOCdevkit/VOC2012`) with paletted PNG labels storing VOC ids (class id + 1,
    0 = background, 255 = boundary). `class_ids` are the 0-based ids of the 20-class benchmark to draw; images take
    their sizes from `sizes` in turn (odd sizes welcome). Returns the `VOCdevkit` folder.
    """
    rng = np.random.default_rng(seed)
    class_ids = class_ids if class_ids is not None else [0, 6, 14, 15]
    sizes = sizes or [(48, 64), (61, 47), (64, 64)]
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = _voc_palette()
    counter = 0
    for split, count, label_folder in (
        ("train", num_train, "SegmentationClass"),
        ("val", num_val, "SegmentationClass"),
        ("aug", num_aug, "SegmentationClassAug"),
    ):
        names = []
        for _ in range(count):
            name = f"2007_{counter:06d}"
            image, label = draw_sample(rng, sizes[counter % len(sizes)], class_ids)
            counter += 1
            voc_label = np.where(label == 255, 255, label.astype(np.int64) + 1).astype(np.uint8)
            voc_label[-1, :] = 0  # a background row: dropped to 255 by the loader
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            label_image = Image.fromarray(voc_label, mode="P")
            label_image.putpalette(palette)
            label_image.save(voc / label_folder / f"{name}.png")
            names.append(name)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return Path(root) / "VOCdevkit"
