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
"""Segmentation datasets for CLIP-RC: benchmark trees, dataset repositories and `save_to_disk` folders.

[`load_segmentation_dataset`] returns a `datasets.DatasetDict` whose splits have exactly two columns, `image` and
`label`, both `datasets.Image(decode=False)` features that hold file paths (or the bytes of a Hub dataset). Building
the index only lists files: no image is opened. Decoding happens lazily, sample by sample, in a
[`SegmentationDecoder`] installed with `set_transform` on every split. The decoder

- opens the image and the label map (errors name the file: missing, unreadable or truncated),
- converts the image to RGB and reads the label map as class indices (a paletted PNG gives its palette indices,
  never its colours),
- checks that image and label map have the same size,
- remaps the stored label ids to the benchmark's train ids (VOC / Context-59: background dropped, COCO-Stuff:
  the 182 stuff-thing ids mapped to the 171 train ids) and checks them against the benchmark
  (`on_invalid_label="error"` raises, `"ignore"` maps them to 255 with a warning).

so `dataset["train"][0]` is `{"image": PIL RGB image, "label": PIL "L" image of train ids, 255 = ignore}`.
Decoding is kept out of the `datasets.Image` feature (`decode=False`) so that these checks can name the file.

`Dataset.with_transform` would replace the decoder: augment the decoded samples instead, as
[`clip_rc.data.AugmentedTrainSamples`] does.
"""

import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from transformers.utils import logging

from ..class_sets import Benchmark, class_names_from_id2label, get_benchmark


logger = logging.get_logger(__name__)

__all__ = [
    "COCO_STUFF_UNUSED_IDS",
    "ID2LABEL_FILE",
    "SegmentationDecoder",
    "as_rgb_image",
    "coco_stuff_train_id_lut",
    "dataset_class_names",
    "installed_decoder",
    "load_segmentation_dataset",
    "read_id2label_file",
    "scale_to_8_bits",
]


# Values of the original COCO-Stuff stuff-thing maps (COCO id - 1) that no annotation uses; dropping them and
# numbering the remaining 171 values in order gives the train ids of mmsegmentation's `*_labelTrainIds.png`.
COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_NUM_STUFF_THING_IDS = 182

LabelMapping = Literal["identity", "reduce_zero_label", "coco_stuff_164k", "coco_stuff_auto"]
LABEL_MAPPINGS = ("identity", "reduce_zero_label", "coco_stuff_164k", "coco_stuff_auto")
COCO_TRAIN_IDS_SUFFIX = "_labelTrainIds.png"
# How a benchmark's label maps are stored in dataset repositories when `label_mapping` is not given (identity for
# the others): ADE20K's maps hold 0 for "other objects" and 1..150 for the classes, in mmsegmentation's
# `ADEChallengeData2016` as in the Hub's scene_parse_150.
_REPOSITORY_LABEL_MAPPINGS = {"ade20k-150": "reduce_zero_label"}
# Column names of other datasets taken for `image` / `label` when those are absent, as transformers'
# semantic-segmentation example renames them.
_COLUMN_ALIASES = {"image": ("pixel_values",), "label": ("annotation",)}
# The file of a dataset repository naming its classes (a JSON object label id -> name), read by transformers'
# semantic-segmentation example.
ID2LABEL_FILE = "id2label.json"

_INVALID = -1


def coco_stuff_train_id_lut(ignore_index: int = 255) -> np.ndarray:
    """
    Look-up table from the original COCO-Stuff stuff-thing map values to the 171 train ids.

    Returns:
        `np.ndarray` of shape `(256,)` and dtype int16: entry `v` is the train id of stored value `v`, `ignore_index`
        for `v == 255`, and -1 for values that are not COCO-Stuff classes (the 11 unused thing ids and 182..254).
    """
    lut = np.full(256, _INVALID, dtype=np.int16)
    used_ids = [value for value in range(COCO_STUFF_NUM_STUFF_THING_IDS) if value not in COCO_STUFF_UNUSED_IDS]
    lut[used_ids] = np.arange(len(used_ids))
    lut[255] = ignore_index
    return lut


def _label_lut(mapping: str, num_classes: int | None, ignore_index: int) -> np.ndarray:
    """Look-up table (256,) int16 from stored label values to train ids; -1 marks values that are not valid."""
    values = np.arange(256, dtype=np.int16)
    if mapping == "coco_stuff_164k":
        lut = coco_stuff_train_id_lut(ignore_index)
    elif mapping == "reduce_zero_label":
        # Background (0) is not a class: 0 -> ignore, k -> k - 1, ignore stays ignore.
        lut = values - 1
        lut[0] = ignore_index
    elif mapping == "identity":
        lut = values
    else:
        raise ValueError(f"Unknown label mapping {mapping!r}; expected one of {', '.join(LABEL_MAPPINGS)}.")
    lut[ignore_index] = ignore_index
    if num_classes is not None:
        out_of_range = (lut >= num_classes) & (lut != ignore_index)
        lut[out_of_range] = _INVALID
    return lut


def _item_path(item: Any) -> str | None:
    """File path of a stored image (a path or a `datasets.Image` dict), `None` for in-memory images."""
    if isinstance(item, dict):
        return item.get("path") or None
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return None


def _describe(item: Any, kind: str) -> str:
    """Human-readable name of a stored image for error messages: its path if it has one."""
    path = _item_path(item)
    return f"{kind} file {path}" if path else f"{kind} (in-memory {type(item).__name__})"


def _printable(path: str | os.PathLike) -> str:
    """A path for messages: bytes that are not UTF-8 (a file name in another encoding) shown as `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _open_image(item: Any, kind: str) -> PIL.Image.Image:
    """Open and fully read an image given as a PIL image, an array, a path or a `datasets.Image` dict."""
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return PIL.Image.fromarray(item)
    if not isinstance(item, (dict, str, os.PathLike)):
        raise TypeError(f"Cannot read a {kind} from an object of type {type(item).__name__}.")
    path, data = _item_path(item), item.get("bytes") if isinstance(item, dict) else None
    name = _describe(item, kind)
    if data is None and not (path and os.path.isfile(path)):
        raise FileNotFoundError(f"Missing {name}.")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
            # `load` decodes the pixels now, so that truncated files fail here, with their name.
            image.load()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"Refusing to decode {name}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read {name}: the file is unreadable or truncated ({error}).") from error
    for warning in caught:
        logger.warning(f"{name}: {warning.message}")
    return image


# PIL modes of 16-bit single-channel images (a 16-bit grayscale PNG or TIFF opens as one of them).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def as_rgb_image(image: PIL.Image.Image, name: str = "image") -> PIL.Image.Image:
    """
    `image` as RGB with 8 bits per channel. 16-bit grayscale is scaled (0..65535 -> 0..255, where PIL's own
    conversion clips every value above 255); 32-bit integer or float pixels, whose range is unknown, are refused with
    a message naming `name` (e.g. "image file x.png").
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = PIL.Image.fromarray(scale_to_8_bits(np.asarray(image)), mode="L")
    elif image.mode in ("I", "F"):
        kind = "integer" if image.mode == "I" else "floating-point"
        raise ValueError(
            f"The {name} has 32-bit {kind} pixels (PIL mode {image.mode!r}), whose range is not defined; save it with "
            "8 or 16 bits per channel."
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def scale_to_8_bits(values: np.ndarray) -> np.ndarray:
    """16-bit values (0..65535) to the nearest 8-bit ones (0..255): round(v * 255 / 65535) = round(v / 257)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


@dataclass
class SegmentationDecoder:
    """
    Decode one batch of stored samples into an RGB image and a label map of benchmark train ids.

    Installed by [`load_segmentation_dataset`] with `Dataset.set_transform`; it can also be called on any batch dict
    whose `image` / `label` entries are PIL images, arrays, paths or `datasets.Image` dicts (`{"path", "bytes"}`).
    Keys other than `image` and `label` pass through unchanged.

    Args:
        num_classes (`int`, *optional*):
            Number of benchmark classes; label ids must lie in `[0, num_classes)` or equal `ignore_index` after the
            mapping. `None` skips the range check.
        label_mapping (`str`, *optional*, defaults to `"identity"`):
            How stored label values become train ids: `"identity"`, `"reduce_zero_label"` (0 -> ignore, k -> k-1),
            `"coco_stuff_164k"` (original 0..181 stuff-thing maps -> 171 train ids) or `"coco_stuff_auto"`
            (`identity` for `*_labelTrainIds.png` files, `coco_stuff_164k` for other files).
        on_invalid_label (`str`, *optional*, defaults to `"error"`):
            `"error"` raises a `ValueError` naming the label file when a value is not a valid id; `"ignore"` maps
            such values to `ignore_index` and logs a warning.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of unlabelled pixels.
    """

    num_classes: int | None = None
    label_mapping: LabelMapping = "identity"
    on_invalid_label: Literal["error", "ignore"] = "error"
    ignore_index: int = 255

    def __post_init__(self):
        if self.label_mapping not in LABEL_MAPPINGS:
            raise ValueError(
                f"Unknown label mapping {self.label_mapping!r}; expected one of {', '.join(LABEL_MAPPINGS)}."
            )
        if self.on_invalid_label not in ("error", "ignore"):
            raise ValueError(f"on_invalid_label must be 'error' or 'ignore', got {self.on_invalid_label!r}.")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        output = dict(batch)
        if "image" in batch:
            output["image"] = [self.decode_image(item) for item in batch["image"]]
        if "label" in batch:
            output["label"] = [self.decode_label(item) for item in batch["label"]]
        if "image" in batch and "label" in batch:
            for image, label, image_item, label_item in zip(
                output["image"], output["label"], batch["image"], batch["label"]
            ):
                if image.size != label.size:
                    raise ValueError(
                        f"Image and label map differ in size: {_describe(image_item, 'image')} is "
                        f"{image.width}x{image.height}, {_describe(label_item, 'label')} is "
                        f"{label.width}x{label.height} (width x height)."
                    )
        return output

    def decode_image(self, item: Any) -> PIL.Image.Image:
        """Open a stored image and convert it to 8-bit RGB (grayscale, 16-bit grayscale, palette, RGBA, CMYK ...
        inputs)."""
        return as_rgb_image(_open_image(item, "image"), _describe(item, "image"))

    def decode_label(self, item: Any) -> PIL.Image.Image:
        """Open a stored label map and return it as a PIL "L" image of train ids (255 = ignore)."""
        label = _open_image(item, "label")
        name = _describe(item, "label")
        if label.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"The {name} is not a single-channel class-id map (PIL mode {label.mode!r}).")
        # For mode "P" `np.asarray` gives the palette indices, which are the class ids.
        values = np.asarray(label).astype(np.int64)
        mapping = self.label_mapping
        if mapping == "coco_stuff_auto":
            is_train_ids = (_item_path(item) or "").endswith(COCO_TRAIN_IDS_SUFFIX)
            mapping = "identity" if is_train_ids else "coco_stuff_164k"
        lut = _label_lut(mapping, self.num_classes, self.ignore_index)
        # 16/32-bit maps may hold values outside the table.
        outside_table = (values < 0) | (values > 255)
        train_ids = lut[np.where(outside_table, 0, values)].astype(np.int64)
        train_ids[outside_table] = _INVALID
        invalid = train_ids == _INVALID
        if invalid.any():
            bad_values = np.unique(values[invalid]).tolist()
            message = (
                f"The {name} holds values {bad_values[:10]} that are not valid ids of the benchmark "
                f"({self.num_classes} classes, label mapping {mapping!r}, ignore index {self.ignore_index})."
            )
            if self.on_invalid_label == "error":
                raise ValueError(message + " Pass on_invalid_label='ignore' to map them to the ignore index.")
            logger.warning(message + " They are mapped to the ignore index.")
            train_ids[invalid] = self.ignore_index
        return PIL.Image.fromarray(train_ids.astype(np.uint8))


def installed_decoder(dataset: datasets.Dataset) -> SegmentationDecoder:
    """The decoder installed on `dataset` by the loader, or a default one (no remapping) if there is none."""
    transform = dataset.format.get("format_kwargs", {}).get("transform")
    return transform if isinstance(transform, SegmentationDecoder) else SegmentationDecoder()


# ----------------------------------------------------------------------------------------------------------------
# Index building
# ----------------------------------------------------------------------------------------------------------------

_LAYOUT_BENCHMARKS = {
    "voc": ("voc",),
    "pascal-context": ("pascal-context-59", "pascal-context-60"),
    "coco-stuff": ("coco-stuff",),
    "ade20k": ("ade20k-150",),
}
# mmsegmentation's ADE20K folders of each split.
_ADE20K_SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def _detect_layouts(root: Path) -> list[tuple[str, Path]]:
    """Local benchmark trees found at `root`: a list of (layout name, dataset root)."""
    layouts = []
    for candidate in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (candidate / "ImageSets" / "SegmentationContext").is_dir():
            layouts.append(("pascal-context", candidate))
            break
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        is_voc = (candidate / "ImageSets" / "Segmentation").is_dir() and (candidate / "SegmentationClass").is_dir()
        # VOC2010 also has VOC's segmentation files; with Context splits it is read as a Context tree.
        if is_voc and not (candidate / "ImageSets" / "SegmentationContext").is_dir():
            layouts.append(("voc", candidate))
            break
    for candidate in (root, root / "ADEChallengeData2016"):
        splits = [candidate / "images" / folder for folder in _ADE20K_SPLIT_FOLDERS.values()]
        if (candidate / "annotations").is_dir() and any(folder.is_dir() for folder in splits):
            layouts.append(("ade20k", candidate))
            break
    # COCO-Stuff's `images` / `annotations` hold `{train,val}2017`; ADE20K's (same names) `training` / `validation`.
    is_ade20k = any(layout == "ade20k" and tree == root for layout, tree in layouts)
    if (root / "images").is_dir() and (root / "annotations").is_dir() and not is_ade20k:
        layouts.append(("coco-stuff", root))
    return layouts


def _read_split_file(split_file: Path) -> list[str]:
    """The sample names of a split file, one a line (UTF-8; any other encoding is an error naming file and line)."""
    if not split_file.is_file():
        raise FileNotFoundError(f"Missing split file {split_file}.")
    names = []
    for number, line in enumerate(split_file.read_bytes().splitlines(), start=1):
        try:
            name = line.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"Line {number} of split file {split_file} is not valid UTF-8 ({line!r}: {error.reason} at byte "
                f"{error.start}); write the split file, and name the files it lists, in UTF-8."
            ) from error
        if name:
            names.append(name)
    return names


def _index_from_split_file(
    split_file: Path, image_dir: Path, label_dirs: Sequence[Path], image_suffix: str = ".jpg"
) -> tuple[list[str], list[str]]:
    """
    Image and label paths of the samples named in `split_file`. The label of a sample is taken from the first of
    `label_dirs` that has it. Raises `FileNotFoundError` naming the split file and the first missing file.
    """
    image_paths, label_paths = [], []
    for name in _read_split_file(split_file):
        image_path = image_dir / f"{name}{image_suffix}"
        if not image_path.is_file():
            raise FileNotFoundError(
                f"Split file {split_file} names sample {name!r}, but its image {image_path} is missing."
            )
        candidates = [folder / f"{name}.png" for folder in label_dirs]
        label_path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if label_path is None:
            expected = " or ".join(str(candidate) for candidate in candidates)
            raise FileNotFoundError(
                f"Split file {split_file} names sample {name!r}, but its label {expected} is missing."
            )
        image_paths.append(str(image_path))
        label_paths.append(str(label_path))
    return image_paths, label_paths


def _voc_index(root: Path, split: str) -> tuple[list[str], list[str]]:
    split_dir = root / "ImageSets" / "Segmentation"
    fine, augmented = root / "SegmentationClass", root / "SegmentationClassAug"
    if split == "val":
        return _index_from_split_file(split_dir / "val.txt", root / "JPEGImages", [fine, augmented])
    # As the reference (`voc12_20_aug_512x512.py`): train.txt with SegmentationClass, aug.txt with
    # SegmentationClassAug; either falls back to the other folder for samples it lacks.
    image_paths, label_paths = _index_from_split_file(split_dir / "train.txt", root / "JPEGImages", [fine, augmented])
    if (split_dir / "aug.txt").is_file():
        aug_images, aug_labels = _index_from_split_file(split_dir / "aug.txt", root / "JPEGImages", [augmented, fine])
        image_paths += aug_images
        label_paths += aug_labels
    else:
        logger.warning(
            f"{split_dir / 'aug.txt'} does not exist: the VOC train split has only the {len(image_paths)} samples "
            "of train.txt, not the 10582 of the augmented set (train.txt + aug.txt) the reference trains on."
        )
    return image_paths, label_paths


def _pascal_context_index(root: Path, split: str) -> tuple[list[str], list[str]]:
    split_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    return _index_from_split_file(split_file, root / "JPEGImages", [root / "SegmentationClassContext"])


def _index_by_stem(
    image_dir: Path, label_dir: Path, label_suffixes: Sequence[str], dataset_name: str
) -> tuple[list[str], list[str]]:
    """
    Pairs every `image_dir/X.jpg` with `label_dir/X{suffix}` for the first of `label_suffixes` that exists. A missing
    folder, an image without label map and a label map without image are errors naming the file.
    """
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"Missing {dataset_name} folder {folder}.")
    image_stems = sorted(entry.name[: -len(".jpg")] for entry in os.scandir(image_dir) if entry.name.endswith(".jpg"))
    label_files = {entry.name for entry in os.scandir(label_dir) if entry.name.endswith(tuple(label_suffixes))}
    label_stems = {
        name[: -len(next(suffix for suffix in label_suffixes if name.endswith(suffix)))] for name in label_files
    }
    image_paths, label_paths = [], []
    for stem in image_stems:
        label_name = next((stem + suffix for suffix in label_suffixes if stem + suffix in label_files), None)
        if label_name is None:
            expected = " or ".join(str(label_dir / (stem + suffix)) for suffix in label_suffixes)
            raise FileNotFoundError(
                f"Missing label file for image {image_dir / (stem + '.jpg')}: expected {expected}."
            )
        image_paths.append(str(image_dir / f"{stem}.jpg"))
        label_paths.append(str(label_dir / label_name))
    orphans = sorted(label_stems - set(image_stems))
    if orphans:
        raise FileNotFoundError(
            f"Missing image file {image_dir / (orphans[0] + '.jpg')} for the label map of {orphans[0]!r} in "
            f"{label_dir} ({len(orphans)} label maps have no image)."
        )
    return image_paths, label_paths


def _coco_stuff_index(root: Path, split: str) -> tuple[list[str], list[str]]:
    """Pairs `images/{split}2017/X.jpg` with `annotations/{split}2017/X_labelTrainIds.png` (preferred) or `X.png`."""
    return _index_by_stem(
        root / "images" / f"{split}2017", root / "annotations" / f"{split}2017", (COCO_TRAIN_IDS_SUFFIX, ".png"),
        "COCO-Stuff",
    )  # fmt: skip


def _ade20k_index(root: Path, split: str) -> tuple[list[str], list[str]]:
    """mmsegmentation's ADE20K layout: pairs `images/{training,validation}/X.jpg` with `annotations/.../X.png`."""
    folder = _ADE20K_SPLIT_FOLDERS[split]
    return _index_by_stem(root / "images" / folder, root / "annotations" / folder, (".png",), "ADE20K")


_TREE_INDEXERS = {
    "voc": _voc_index,
    "pascal-context": _pascal_context_index,
    "coco-stuff": _coco_stuff_index,
    "ade20k": _ade20k_index,
}
_TREE_SPLITS = dict.fromkeys(_TREE_INDEXERS, ("train", "val"))


def _select_splits(available: Sequence[str], splits: Sequence[str] | str | None, source: str) -> list[str]:
    if splits is None:
        return list(available)
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [split for split in splits if split not in available]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown} for {source}; available splits: {list(available)}.")
    return splits


def _path_features() -> datasets.Features:
    return datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)})


def _check_utf8_names(paths: Sequence[str]):
    """Datasets stores paths as UTF-8 strings: a file name in another encoding is an error naming the file."""
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"The file name of {_printable(path)} is not valid UTF-8 (it is in another encoding); rename the file "
                "(e.g. with `convmv`) to load it."
            ) from error


def _load_tree(layout: str, root: Path, splits: Sequence[str] | str | None) -> datasets.DatasetDict:
    indexer = _TREE_INDEXERS[layout]
    dataset_dict = {}
    for split in _select_splits(_TREE_SPLITS[layout], splits, str(root)):
        image_paths, label_paths = indexer(root, split)
        _check_utf8_names(image_paths + label_paths)
        dataset_dict[split] = datasets.Dataset.from_dict(
            {"image": image_paths, "label": label_paths}, features=_path_features(), split=split
        )
    return datasets.DatasetDict(dataset_dict)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _column(column_names: Sequence[str], requested: str, role: str) -> str:
    """The column holding `role` (`image` / `label`): `requested`, or a well-known alias of the default name (the
    `annotation` column of scene_parse_150 for `label`) when the default is absent."""
    if requested == role and requested not in column_names:
        alias = next((name for name in _COLUMN_ALIASES[role] if name in column_names), None)
        if alias is not None:
            logger.info(f"Using column {alias!r} as the {role} column.")
            return alias
    return requested


def _load_repository(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    data_dir: str | None,
    image_column: str,
    label_column: str,
    splits: Sequence[str] | str | None,
) -> datasets.DatasetDict:
    """Load a Hub / local dataset repository and bring it to the `image` / `label` schema (no decoding)."""
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        loaded, name = source, "the given dataset"
    elif Path(source).is_dir() and _is_saved_dataset(Path(source)):
        loaded, name = datasets.load_from_disk(os.fspath(source)), os.fspath(source)
    else:
        loaded, name = datasets.load_dataset(os.fspath(source), data_dir=data_dir), os.fspath(source)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({str(loaded.split or "train"): loaded})

    dataset_dict = {}
    for split in _select_splits(list(loaded.keys()), splits, name):
        dataset = loaded[split]
        columns = {
            _column(dataset.column_names, image_column, "image"): "image",
            _column(dataset.column_names, label_column, "label"): "label",
        }
        missing = [column for column in columns if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Split {split!r} of {name} has no column(s) {missing}; its columns are {dataset.column_names}. "
                "Pass image_column= and label_column=."
            )
        extra = [column for column in dataset.column_names if column not in columns]
        if extra:
            logger.info(f"Dropping columns {extra} of split {split!r} of {name}: only image and label are kept.")
            dataset = dataset.remove_columns(extra)
        for column in columns:
            feature = dataset.features[column]
            is_path = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
            if not (isinstance(feature, datasets.Image) or is_path):
                raise ValueError(
                    f"Column {column!r} of split {split!r} of {name} must be a datasets.Image feature or hold file "
                    f"paths, got {feature}."
                )
        dataset = dataset.rename_columns({old: new for old, new in columns.items() if old != new})
        # `cast_column` to an Image feature only changes the feature (and path strings to Image storage); unlike
        # `cast` it does not rewrite the dataset.
        for column, feature in _path_features().items():
            dataset = dataset.cast_column(column, feature)
        dataset_dict[split] = dataset
    return datasets.DatasetDict(dataset_dict)


def load_segmentation_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    benchmark: str | Benchmark | None = None,
    data_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    splits: Sequence[str] | str | None = None,
    label_mapping: Literal["identity", "reduce_zero_label", "coco_stuff_164k"] | None = None,
    on_invalid_label: Literal["error", "ignore"] = "error",
    num_classes: int | None = None,
) -> datasets.DatasetDict:
    """
    Load a semantic segmentation dataset as a `DatasetDict` with lazily decoded `image` and `label` columns.

    `source` can be:

    - a local PASCAL VOC 2012 tree (the `VOCdevkit` folder, `VOCdevkit/VOC2012` or a folder holding `VOC2012`) with
      `JPEGImages`, `SegmentationClass`, `SegmentationClassAug` and `ImageSets/Segmentation/{train,val,aug}.txt`:
      `train` = train.txt (labels from `SegmentationClass`) + aug.txt (labels from `SegmentationClassAug`), `val` =
      val.txt; background is dropped (0 -> 255, k -> k-1). Benchmark `"voc"`.
    - a local COCO-Stuff 164k tree with `images/{train,val}2017/*.jpg` and `annotations/{train,val}2017/` holding
      either `*_labelTrainIds.png` (171 train ids, used as stored) or the original `*.png` stuff-thing maps (0..181,
      mapped to the 171 train ids). Benchmark `"coco-stuff"`.
    - a local PASCAL Context tree in mmsegmentation layout (`VOCdevkit/VOC2010` with `JPEGImages`,
      `SegmentationClassContext`, `ImageSets/SegmentationContext/{train,val}.txt`). Benchmark `"pascal-context-59"`
      (default; background dropped) or `"pascal-context-60"` (background kept as class 0).
    - a local ADE20K tree in mmsegmentation layout (`ADEChallengeData2016` or its parent, with
      `images/{training,validation}/*.jpg` and `annotations/{training,validation}/*.png`): splits `train` and `val`;
      stored 0 ("other objects") -> 255, k -> k-1 (`reduce_zero_label`). Benchmark `"ade20k-150"`.
    - anything else: a dataset saved with `save_to_disk`, a local dataset repository (parquet / arrow / imagefolder)
      or a Hub dataset name, loaded with `datasets` (`data_dir` is passed to `datasets.load_dataset`), or an
      in-memory `Dataset` / `DatasetDict`. `image_column` / `label_column` name its columns (renamed to
      `image` / `label`; other columns are dropped; without an `image` / `label` column, `pixel_values` /
      `annotation` are taken, as transformers' semantic-segmentation example does); `label_mapping` says how its
      stored label values become train ids (`"identity"`, `"reduce_zero_label"` or `"coco_stuff_164k"`; default:
      `"reduce_zero_label"` for `benchmark="ade20k-150"`, which the Hub's scene_parse_150 parquet layout, columns
      `image` / `annotation`, needs, `"identity"` otherwise).

    Building the index only lists files (and checks that every image named in a split file, and its label map,
    exist); nothing is decoded. Each split gets a [`SegmentationDecoder`] as its format transform, so indexing a split
    returns `{"image": PIL RGB image, "label": PIL "L" image of train ids (255 = ignore)}`.

    Args:
        source (`str`, `os.PathLike`, `datasets.Dataset` or `datasets.DatasetDict`):
            Where the data is (see above).
        benchmark (`str` or [`Benchmark`], *optional*):
            The benchmark whose train ids the labels hold. Inferred for the VOC, COCO-Stuff and ADE20K trees; for
            PASCAL Context it selects 59 or 60 classes. For datasets loaded with `datasets`, `None` leaves the id
            check to `num_classes`.
        data_dir (`str`, *optional*):
            `data_dir` of `datasets.load_dataset` (a sub-folder of a dataset repository).
        image_column (`str`, *optional*, defaults to `"image"`):
            Name of the image column of a dataset loaded with `datasets`.
        label_column (`str`, *optional*, defaults to `"label"`):
            Name of the label-map column of a dataset loaded with `datasets`.
        splits (`str` or `Sequence[str]`, *optional*):
            Splits to load; all available splits by default.
        label_mapping (`str`, *optional*):
            Stored-value-to-train-id mapping of a dataset loaded with `datasets` (local trees set their own);
            default: the benchmark's convention (see above).
        on_invalid_label (`str`, *optional*, defaults to `"error"`):
            What decoding does with a label value that is not a train id of the benchmark nor 255: `"error"` raises
            a `ValueError` naming the file, `"ignore"` maps it to 255 and logs a warning.
        num_classes (`int`, *optional*):
            Number of classes the labels index (your own class list): train ids must lie in `[0, num_classes)` or be
            255. With a benchmark (given or inferred from a tree) it must equal the benchmark's.

    Returns:
        `datasets.DatasetDict`: one `Dataset` per split with `image` and `label` columns
        (`datasets.Image(decode=False)` features) and a [`SegmentationDecoder`] format transform.

    Raises:
        `FileNotFoundError`: A split file, or an image or label map it names, is missing.
        `ValueError`: Unknown benchmark, split or column, a benchmark that does not fit the tree, or a `num_classes`
            that is not the benchmark's.
    """
    benchmark = get_benchmark(benchmark) if benchmark is not None else None
    layouts = []
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        layouts = _detect_layouts(Path(source))
        if benchmark is not None:
            layouts = [(layout, root) for layout, root in layouts if benchmark.name in _LAYOUT_BENCHMARKS[layout]]
        if len(layouts) > 1:
            found = ", ".join(f"{layout} at {root}" for layout, root in layouts)
            raise ValueError(f"{source} holds several benchmark trees ({found}); pass benchmark= to choose one.")

    if layouts:
        dataset_dict, decoder = _tree_with_decoder(*layouts[0], benchmark, splits, label_mapping, on_invalid_label)
    else:
        dataset_dict = _load_repository(source, data_dir, image_column, label_column, splits)
        if label_mapping is None:
            label_mapping = _REPOSITORY_LABEL_MAPPINGS.get(benchmark.name, "identity") if benchmark else "identity"
        if label_mapping not in ("identity", "reduce_zero_label", "coco_stuff_164k"):
            raise ValueError(
                f"label_mapping must be 'identity', 'reduce_zero_label' or 'coco_stuff_164k', got {label_mapping!r}."
            )
        ignore_index = benchmark.ignore_index if benchmark is not None else 255
        decoder = SegmentationDecoder(benchmark.num_classes if benchmark else None, label_mapping, on_invalid_label,
                                      ignore_index)  # fmt: skip
    if num_classes is not None and decoder.num_classes is None:
        decoder.num_classes = num_classes
    elif num_classes is not None and num_classes != decoder.num_classes:
        if layouts:
            where = f"the {layouts[0][0]} tree at {layouts[0][1]}"
        else:
            name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given dataset"
            where = f"{name} (benchmark {benchmark.name})"
        raise ValueError(
            f"The labels of {where} are ids of {decoder.num_classes} classes, but {num_classes} classes are used."
        )
    dataset_dict.set_transform(decoder)
    return dataset_dict


def _tree_with_decoder(
    layout: str, root: Path, benchmark: Benchmark | None, splits, label_mapping: str | None, on_invalid_label: str
) -> tuple[datasets.DatasetDict, SegmentationDecoder]:
    """The splits of a local benchmark tree and the decoder of its label convention."""
    if label_mapping not in (None, "identity"):
        raise ValueError(
            f"label_mapping={label_mapping!r} applies to datasets loaded with `datasets`; the {layout} tree at {root} "
            "sets its own."
        )
    benchmark = benchmark or get_benchmark(_LAYOUT_BENCHMARKS[layout][0])
    dataset_dict = _load_tree(layout, root, splits)
    tree_mapping = {
        "voc": "reduce_zero_label",
        "coco-stuff": "coco_stuff_auto",
        "pascal-context": "reduce_zero_label" if benchmark.name == "pascal-context-59" else "identity",
        "ade20k": "reduce_zero_label",
    }[layout]
    sizes = ", ".join(f"{split}={len(split_dataset)}" for split, split_dataset in dataset_dict.items())
    logger.info(f"Indexed the {layout} tree at {root}: {sizes}.")
    return dataset_dict, SegmentationDecoder(benchmark.num_classes, tree_mapping, on_invalid_label,
                                             benchmark.ignore_index)  # fmt: skip


def read_id2label_file(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names of an `id2label.json` file (a JSON object label id -> name), in id order; errors name it."""
    path = Path(path)
    try:
        id2label = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a UTF-8 JSON file ({error}).") from error
    return class_names_from_id2label(id2label, str(path))


def dataset_class_names(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict, cache_dir: str | None = None
) -> tuple[tuple[str, ...], str] | None:
    """
    The class names a dataset repository declares in the `id2label.json` at its root, as transformers'
    semantic-segmentation example reads them, with the file they come from; `None` when it has none.

    A local folder's file is read; for anything else that names a Hub dataset repository the file is fetched with
    `huggingface_hub.hf_hub_download(repo_id, "id2label.json", repo_type="dataset")` (a repository without it, or a
    name that is no repository, gives `None`; when the Hub cannot be reached and no copy is cached, a warning says so
    and `None` is returned).
    """
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return None
    local = Path(source)
    if local.is_dir():
        path = local / ID2LABEL_FILE
        return (read_id2label_file(path), str(path)) if path.is_file() else None
    if local.exists():
        return None
    try:
        path = hf_hub_download(os.fspath(source), ID2LABEL_FILE, repo_type="dataset", cache_dir=cache_dir)
    except LocalEntryNotFoundError as error:
        logger.warning(
            f"Could not look for {ID2LABEL_FILE} in the Hub dataset repository {source} ({error}); pass the classes "
            "with --class_names / --class_names_file if it has one."
        )
        return None
    except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError):
        return None
    return read_id2label_file(path), f"{ID2LABEL_FILE} of the Hub dataset {source}"
