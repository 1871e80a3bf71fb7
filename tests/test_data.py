from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from clip_rc import CLIPRCImageProcessor
from clip_rc.data import (
    REFERENCE_IMAGE_MEAN,
    REFERENCE_IMAGE_STD,
    AugmentedTrainSamples,
    SegmentationDecoder,
    SegmentationTrainTransform,
    coco_stuff_train_id_lut,
    collate_fn,
    load_segmentation_dataset,
    photometric_distortion,
    random_crop_box,
)
from clip_rc.data.transforms import _hsv_to_rgb_uint8, _rgb_to_hsv_uint8


VOC_PALETTE_FLAT = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [index % 256 for index in range(3 * 253)]


# ---------------------------------------------------------------------------------------------------------------
# Fixture trees
# ---------------------------------------------------------------------------------------------------------------


def _save_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def _save_label(path: Path, values: np.ndarray, paletted: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    label = PIL.Image.fromarray(values.astype(np.uint8))
    if paletted:
        # A paletted PNG whose colours differ from its indices: readers must return the indices.
        label = label.convert("P")
        label.putpalette(VOC_PALETTE_FLAT)
    label.save(path)


def _label_pattern(height: int, width: int, values: list[int]) -> np.ndarray:
    """Vertical stripes of the given values, left to right."""
    stripes = np.array_split(np.arange(width), len(values))
    label = np.zeros((height, width), dtype=np.uint8)
    for value, columns in zip(values, stripes):
        label[:, columns] = value
    return label


def _write_split(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))


def make_voc_tree(root: Path) -> Path:
    """VOCdevkit/VOC2012 with 2 train (SegmentationClass), 2 aug (SegmentationClassAug) and 1 val sample."""
    voc = root / "VOCdevkit" / "VOC2012"
    samples = {"t1": (20, 30), "t2": (24, 16), "a1": (18, 22), "a2": (26, 20), "v1": (30, 40)}
    for index, (name, (height, width)) in enumerate(samples.items()):
        _save_image(voc / "JPEGImages" / f"{name}.jpg", height, width, seed=index)
    # Raw VOC ids: 0 background, 1..20 classes, 255 boundary.
    _save_label(voc / "SegmentationClass" / "t1.png", _label_pattern(20, 30, [0, 1, 15, 255]), paletted=True)
    _save_label(voc / "SegmentationClass" / "t2.png", _label_pattern(24, 16, [20, 7]), paletted=True)
    _save_label(voc / "SegmentationClassAug" / "a1.png", _label_pattern(18, 22, [3, 0]))
    _save_label(voc / "SegmentationClassAug" / "a2.png", _label_pattern(26, 20, [12]))
    # The augmented folder also labels t1 differently: the train.txt sample must keep SegmentationClass.
    _save_label(voc / "SegmentationClassAug" / "t1.png", _label_pattern(20, 30, [5]))
    _save_label(voc / "SegmentationClass" / "v1.png", _label_pattern(30, 40, [2, 16, 255]), paletted=True)
    _write_split(voc / "ImageSets" / "Segmentation" / "train.txt", ["t1", "t2"])
    _write_split(voc / "ImageSets" / "Segmentation" / "aug.txt", ["a1", "a2"])
    _write_split(voc / "ImageSets" / "Segmentation" / "val.txt", ["v1"])
    return voc


def make_coco_tree(root: Path) -> Path:
    """COCO-Stuff 164k with one `_labelTrainIds.png` and one original stuff-thing map per split."""
    for split in ("train", "val"):
        _save_image(root / "images" / f"{split}2017" / "000000000001.jpg", 20, 28, seed=1)
        _save_image(root / "images" / f"{split}2017" / "000000000002.jpg", 16, 12, seed=2)
        annotations = root / "annotations" / f"{split}2017"
        _save_label(annotations / "000000000001_labelTrainIds.png", _label_pattern(20, 28, [0, 170, 255]))
        # Original maps hold COCO id - 1 (0..181); 12 -> 11 and 181 -> 170 (11 unused ids are skipped).
        _save_label(annotations / "000000000002.png", _label_pattern(16, 12, [0, 12, 181, 255]))
    return root


def make_context_tree(root: Path) -> Path:
    context = root / "VOCdevkit" / "VOC2010"
    for index, (name, split) in enumerate((("c1", "train"), ("c2", "val"))):
        _save_image(context / "JPEGImages" / f"{name}.jpg", 12, 18, seed=index)
        _save_label(context / "SegmentationClassContext" / f"{name}.png", _label_pattern(12, 18, [0, 1, 59]))
        _write_split(context / "ImageSets" / "SegmentationContext" / f"{split}.txt", [name])
    return context


def make_ade20k_tree(root: Path, sizes: tuple[tuple[int, int], ...] = ((20, 28), (16, 12))) -> Path:
    """mmsegmentation's ADE20K layout, `root/ADEChallengeData2016`, one image per size in each split; label maps store
    0 ("other objects"), 1..150 and (here) 255. Returns the `ADEChallengeData2016` folder."""
    ade = root / "ADEChallengeData2016"
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for index, (height, width) in enumerate(sizes, start=1):
            _save_image(ade / "images" / split / f"{prefix}_{index:08d}.jpg", height, width, seed=index)
            values = [0, 1, 150, 255] if index == 1 else [75, 0, 2]
            label_path = ade / "annotations" / split / f"{prefix}_{index:08d}.png"
            _save_label(label_path, _label_pattern(height, width, values))
    return ade


def _label_ids(label: PIL.Image.Image) -> np.ndarray:
    assert isinstance(label, PIL.Image.Image) and label.mode == "L"
    return np.asarray(label)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_voc_tree_splits_sizes_and_ids(tmp_path):
    make_voc_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit")
    assert isinstance(dataset, datasets.DatasetDict)
    assert set(dataset) == {"train", "val"}
    assert dataset["train"].num_rows == 4 and dataset["val"].num_rows == 1
    for split in dataset.values():
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.Image)

    names = [Path(item["path"]).stem for item in dataset["train"].with_format(None)["image"]]
    assert names == ["t1", "t2", "a1", "a2"]
    label_folders = [Path(item["path"]).parent.name for item in dataset["train"].with_format(None)["label"]]
    assert label_folders == ["SegmentationClass", "SegmentationClass", "SegmentationClassAug", "SegmentationClassAug"]

    sample = dataset["train"][0]
    assert isinstance(sample["image"], PIL.Image.Image) and sample["image"].mode == "RGB"
    assert sample["image"].size == (30, 20)
    # Background dropped: 0 -> 255, k -> k - 1, 255 stays; the palette indices are read, not the colours.
    np.testing.assert_array_equal(_label_ids(sample["label"]), _label_pattern(20, 30, [255, 0, 14, 255]))
    np.testing.assert_array_equal(_label_ids(dataset["train"][1]["label"]), _label_pattern(24, 16, [19, 6]))
    np.testing.assert_array_equal(_label_ids(dataset["train"][2]["label"]), _label_pattern(18, 22, [2, 255]))
    val = dataset["val"][0]
    assert val["image"].size == val["label"].size == (40, 30)
    np.testing.assert_array_equal(_label_ids(val["label"]), _label_pattern(30, 40, [1, 15, 255]))


def test_voc_tree_select_split_and_benchmark_check(tmp_path):
    make_voc_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit" / "VOC2012", benchmark="voc", splits="val")
    assert list(dataset) == ["val"]
    with pytest.raises(ValueError, match=r"Unknown split\(s\) \['test'\].*\['train', 'val'\]"):
        load_segmentation_dataset(tmp_path / "VOCdevkit", splits=["test"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_stuff_tree_both_label_formats(tmp_path, split):
    make_coco_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path, splits=[split])
    assert list(dataset) == [split] and dataset[split].num_rows == 2
    first, second = dataset[split][0], dataset[split][1]
    assert first["image"].size == (28, 20) and second["image"].size == (12, 16)
    np.testing.assert_array_equal(_label_ids(first["label"]), _label_pattern(20, 28, [0, 170, 255]))
    np.testing.assert_array_equal(_label_ids(second["label"]), _label_pattern(16, 12, [0, 11, 170, 255]))


def test_ade20k_tree_reduces_the_zero_label(tmp_path):
    """0 (other objects) -> 255, k -> k - 1, 255 stays: exactly mmsegmentation's reduce_zero_label."""
    ade = make_ade20k_tree(tmp_path)
    for source in (ade, tmp_path):  # the ADEChallengeData2016 folder or its parent
        dataset = load_segmentation_dataset(source)
        assert dataset.num_rows == {"train": 2, "val": 2}
        names = [Path(item["path"]).name for item in dataset["val"].with_format(None)["image"]]
        assert names == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
        for split in ("train", "val"):
            first, second = dataset[split][0], dataset[split][1]
            assert first["image"].size == (28, 20) and second["image"].size == (12, 16)
            np.testing.assert_array_equal(_label_ids(first["label"]), _label_pattern(20, 28, [255, 0, 149, 255]))
            np.testing.assert_array_equal(_label_ids(second["label"]), _label_pattern(16, 12, [74, 255, 1]))
    assert load_segmentation_dataset(ade, benchmark="ade20k-150", splits="val").num_rows == {"val": 2}
    # A stored value beyond the 150 classes is named with its file.
    _save_label(ade / "annotations" / "validation" / "ADE_val_00000002.png", _label_pattern(16, 12, [151, 3]))
    with pytest.raises(ValueError, match=r"ADE_val_00000002\.png holds values \[151\].*150 classes"):
        load_segmentation_dataset(ade, splits="val")["val"][1]
    # The labels index 150 classes: another class count is refused.
    with pytest.raises(ValueError, match=r"ade20k tree at .* are ids of 150 classes, but 171 classes are used"):
        load_segmentation_dataset(ade, num_classes=171)
    (ade / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Missing label file for image .*ADE_train_00000002\.jpg"):
        load_segmentation_dataset(ade, splits="train")


def test_ade20k_in_the_hubs_parquet_layout(tmp_path):
    """scene_parse_150's parquet columns (image, annotation, scene_category), stored labels 0..150: with
    benchmark="ade20k-150" the annotation column and reduce_zero_label are the defaults."""
    stored = [_label_pattern(8, 10, [0, 1, 150]), _label_pattern(8, 10, [255, 37])]
    shard = datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.fromarray(np.full((8, 10, 3), 60, np.uint8))] * 2,
            "annotation": [PIL.Image.fromarray(values) for values in stored],
            "scene_category": [3, 7],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.Value("int64")}
        ),
    )
    repository = tmp_path / "ade20k-parquet"
    shard.to_parquet(str(repository / "data" / "validation-00000-of-00001.parquet"))
    dataset = load_segmentation_dataset(repository, benchmark="ade20k-150")
    assert list(dataset) == ["validation"] and dataset["validation"].column_names == ["image", "label"]
    np.testing.assert_array_equal(_label_ids(dataset["validation"][0]["label"]), _label_pattern(8, 10, [255, 0, 149]))
    np.testing.assert_array_equal(_label_ids(dataset["validation"][1]["label"]), _label_pattern(8, 10, [255, 36]))
    # Stored as train ids already: identity, checked against the 150 classes.
    as_stored = load_segmentation_dataset(repository, benchmark="ade20k-150", label_mapping="identity")
    with pytest.raises(ValueError, match=r"holds values \[150\]"):
        as_stored["validation"][0]
    # Without a benchmark, the ids are checked against the number of classes used.
    counted = load_segmentation_dataset(repository, label_mapping="reduce_zero_label", num_classes=37)
    with pytest.raises(ValueError, match=r"holds values \[150\].*\(37 classes"):
        counted["validation"][0]


def test_coco_stuff_train_id_lut():
    lut = coco_stuff_train_id_lut()
    assert lut[0] == 0 and lut[10] == 10 and lut[12] == 11 and lut[181] == 170 and lut[255] == 255
    assert all(lut[value] == -1 for value in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, 182, 254))
    assert sorted(lut[lut >= 0][:-1].tolist()) == list(range(171))


@pytest.mark.parametrize(
    "benchmark_name, expected", [("pascal-context-59", [255, 0, 58]), ("pascal-context-60", [0, 1, 59])]
)
def test_pascal_context_tree(tmp_path, benchmark_name, expected):
    make_context_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", benchmark=benchmark_name)
    assert dict(dataset.num_rows.items()) == {"train": 1, "val": 1}
    for split in ("train", "val"):
        sample = dataset[split][0]
        assert sample["image"].size == (18, 12)
        np.testing.assert_array_equal(_label_ids(sample["label"]), _label_pattern(12, 18, expected))


def test_context_default_is_59_classes_and_wrong_benchmark_fails(tmp_path):
    make_context_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path)
    assert _label_ids(dataset["val"][0]["label"])[0, 0] == 255
    with pytest.raises(ValueError, match="no column"):
        # No COCO tree here, so the folder is read as a generic dataset repository, which has no such columns.
        load_segmentation_dataset(tmp_path / "VOCdevkit" / "VOC2010" / "JPEGImages", benchmark="coco-stuff")


def test_building_the_index_does_not_decode(tmp_path, monkeypatch):
    make_voc_tree(tmp_path)
    opened = []
    original_open = PIL.Image.open

    def recording_open(*args, **kwargs):
        opened.append(args)
        return original_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit")
    assert opened == []
    dataset["val"][0]
    assert len(opened) == 2


def _in_memory_dataset(num_rows: int = 3) -> datasets.Dataset:
    images = [PIL.Image.fromarray(np.full((8, 10, 3), 40 * index, np.uint8)) for index in range(num_rows)]
    masks = [PIL.Image.fromarray(_label_pattern(8, 10, [index, 255, 0])) for index in range(num_rows)]
    return datasets.Dataset.from_dict(
        {"img": images, "mask": masks, "caption": [f"sample {index}" for index in range(num_rows)]},
        features=datasets.Features(
            {"img": datasets.Image(), "mask": datasets.Image(), "caption": datasets.Value("string")}
        ),
    )


def test_saved_dataset_folder_with_named_columns(tmp_path):
    datasets.DatasetDict({"train": _in_memory_dataset(3), "validation": _in_memory_dataset(2)}).save_to_disk(
        tmp_path / "saved"
    )
    dataset = load_segmentation_dataset(tmp_path / "saved", image_column="img", label_column="mask", benchmark="voc")
    assert dataset.num_rows == {"train": 3, "validation": 2}
    assert dataset["train"].column_names == ["image", "label"]
    sample = dataset["train"][2]
    assert sample["image"].mode == "RGB" and sample["image"].size == (10, 8)
    np.testing.assert_array_equal(_label_ids(sample["label"]), _label_pattern(8, 10, [2, 255, 0]))

    reduced = load_segmentation_dataset(
        tmp_path / "saved", image_column="img", label_column="mask", label_mapping="reduce_zero_label", splits="train"
    )
    np.testing.assert_array_equal(_label_ids(reduced["train"][2]["label"]), _label_pattern(8, 10, [1, 255, 255]))


def test_parquet_repository_folder(tmp_path):
    repository = tmp_path / "repo"
    _in_memory_dataset(3).to_parquet(str(repository / "data" / "train-00000-of-00001.parquet"))
    _in_memory_dataset(2).to_parquet(str(repository / "data" / "validation-00000-of-00001.parquet"))
    dataset = load_segmentation_dataset(repository, image_column="img", label_column="mask", benchmark="voc")
    assert dataset.num_rows == {"train": 3, "validation": 2}
    np.testing.assert_array_equal(_label_ids(dataset["validation"][1]["label"]), _label_pattern(8, 10, [1, 255, 0]))


def test_path_columns_are_decoded_lazily_and_missing_files_named(tmp_path):
    make_voc_tree(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    paths = datasets.Dataset.from_dict(
        {"photo": [str(voc / "JPEGImages" / "v1.jpg")], "mask": [str(voc / "SegmentationClass" / "v1.png")]}
    )
    dataset = load_segmentation_dataset(
        paths, image_column="photo", label_column="mask", label_mapping="reduce_zero_label"
    )
    assert list(dataset) == ["train"] and dataset["train"].features["label"] == datasets.Image(decode=False)
    np.testing.assert_array_equal(_label_ids(dataset["train"][0]["label"]), _label_pattern(30, 40, [1, 15, 255]))
    (voc / "SegmentationClass" / "v1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Missing label file .*SegmentationClass/v1\.png"):
        dataset["train"][0]


def test_ambiguous_trees_and_tree_options(tmp_path):
    make_voc_tree(tmp_path)
    make_context_tree(tmp_path)
    with pytest.raises(ValueError, match="several benchmark trees.*pass benchmark="):
        load_segmentation_dataset(tmp_path / "VOCdevkit")
    assert load_segmentation_dataset(tmp_path / "VOCdevkit", benchmark="voc").num_rows == {"train": 4, "val": 1}
    context = load_segmentation_dataset(tmp_path / "VOCdevkit", benchmark="pascal-context-60")
    assert context.num_rows == {"train": 1, "val": 1}
    with pytest.raises(ValueError, match="label_mapping='reduce_zero_label' applies to datasets loaded with"):
        load_segmentation_dataset(tmp_path / "VOCdevkit" / "VOC2012", label_mapping="reduce_zero_label")


def test_missing_column_is_reported(tmp_path):
    _in_memory_dataset(1).save_to_disk(tmp_path / "single")
    with pytest.raises(ValueError, match=r"no column\(s\) \['image', 'label'\].*'img', 'mask', 'caption'"):
        load_segmentation_dataset(tmp_path / "single")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_split_file_naming_a_missing_image(tmp_path):
    voc = make_voc_tree(tmp_path)
    _write_split(voc / "ImageSets" / "Segmentation" / "val.txt", ["v1", "ghost"])
    with pytest.raises(FileNotFoundError, match=r"val\.txt names sample 'ghost'.*JPEGImages/ghost\.jpg is missing"):
        load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")


def test_split_file_naming_a_missing_label(tmp_path):
    voc = make_voc_tree(tmp_path)
    (voc / "SegmentationClass" / "v1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'v1'.*SegmentationClass/v1\.png.*is missing"):
        load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")


def test_coco_image_without_label(tmp_path):
    make_coco_tree(tmp_path)
    _save_image(tmp_path / "images" / "val2017" / "000000000003.jpg", 4, 4)
    with pytest.raises(FileNotFoundError, match=r"Missing label file for image .*000000000003\.jpg"):
        load_segmentation_dataset(tmp_path, splits="val")


def test_missing_file_at_decode_time(tmp_path):
    voc = make_voc_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")
    (voc / "JPEGImages" / "v1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"Missing image file .*JPEGImages/v1\.jpg"):
        dataset["val"][0]


def test_image_and_label_of_different_sizes(tmp_path):
    voc = make_voc_tree(tmp_path)
    _save_image(voc / "JPEGImages" / "v1.jpg", 31, 40)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")
    message = r"differ in size: image file .*v1\.jpg is 40x31, label file .*v1\.png is 40x30"
    with pytest.raises(ValueError, match=message):
        dataset["val"][0]


def test_truncated_and_unreadable_images(tmp_path):
    voc = make_voc_tree(tmp_path)
    image_path = voc / "JPEGImages" / "v1.jpg"
    image_path.write_bytes(image_path.read_bytes()[:200])
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")
    with pytest.raises(ValueError, match=r"Cannot read image file .*v1\.jpg: the file is unreadable or truncated"):
        dataset["val"][0]
    image_path.write_text("not an image")
    with pytest.raises(ValueError, match=r"Cannot read image file .*v1\.jpg"):
        dataset["val"][0]


def test_invalid_label_ids_error_or_ignore(tmp_path):
    voc = make_voc_tree(tmp_path)
    _save_label(voc / "SegmentationClass" / "v1.png", _label_pattern(30, 40, [2, 21, 255]), paletted=True)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")
    with pytest.raises(ValueError, match=r"label file .*v1\.png holds values \[21\] that are not valid ids"):
        dataset["val"][0]

    ignoring = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val", on_invalid_label="ignore")
    logger = logging.get_logger("clip_rc.data")
    with CaptureLogger(logger) as captured:
        label = _label_ids(ignoring["val"][0]["label"])
    np.testing.assert_array_equal(label, _label_pattern(30, 40, [1, 255, 255]))
    assert "v1.png" in captured.out and "[21]" in captured.out


def test_invalid_coco_ids_and_rgb_labels():
    decoder = SegmentationDecoder(num_classes=171, label_mapping="coco_stuff_164k")
    with pytest.raises(ValueError, match=r"values \[11\]"):
        decoder.decode_label(_label_pattern(4, 4, [11, 0]))
    with pytest.raises(ValueError, match=r"values \[300\]"):
        SegmentationDecoder(num_classes=20).decode_label(np.array([[0, 300]], np.uint16))
    with pytest.raises(ValueError, match="not a single-channel class-id map"):
        decoder.decode_label(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="on_invalid_label"):
        SegmentationDecoder(on_invalid_label="drop")


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------

COLOURS = np.array([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 220, 30], [200, 30, 210]], np.uint8)
IGNORE_COLOUR = np.array([128, 128, 128], np.uint8)


def colour_coded_sample(height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric block layout of 5 classes and an ignore block; the image colour encodes the label."""
    label = np.zeros((height, width), np.uint8)
    label[:, width // 4 :] = 1
    label[: height // 2, width // 2 :] = 2
    label[height // 2 :, 3 * width // 4 :] = 3
    label[: height // 3, : width // 4] = 4
    label[height - 8 :, : width // 4] = 255
    image = np.where((label == 255)[..., None], IGNORE_COLOUR, COLOURS[np.minimum(label, 4)])
    return image, label


def _uniform_neighbourhood(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2 * radius + 1)^2 window holds a single label value."""

    def window_max(values):
        # Separable: a row pass then a column pass.
        values = torch.nn.functional.max_pool2d(values, (1, 2 * radius + 1), stride=1, padding=(0, radius))
        return torch.nn.functional.max_pool2d(values, (2 * radius + 1, 1), stride=1, padding=(radius, 0))

    values = labels[None, None].float()
    return (window_max(values) == -window_max(-values))[0, 0]


def _denormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(REFERENCE_IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(REFERENCE_IMAGE_STD).view(3, 1, 1)
    return pixel_values * std + mean


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_labels_aligned_with_the_image(seed):
    image, label = colour_coded_sample()
    transform = SegmentationTrainTransform(photometric=False)
    pixel_values, labels = transform.augment(
        PIL.Image.fromarray(image), PIL.Image.fromarray(label), np.random.default_rng(seed)
    )
    assert pixel_values.shape == (3, 512, 512) and pixel_values.dtype == torch.float32
    assert labels.shape == (512, 512) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 4, 255}

    # Bilinear image vs nearest label: colours mix within one source pixel (up to 1024 / 48 output pixels) of a
    # boundary, so check the pixels farther than that from any other label.
    rgb = _denormalise(pixel_values)
    interior = _uniform_neighbourhood(labels, radius=23)
    for class_id in range(5):
        selected = interior & (labels == class_id)
        if selected.any():
            expected = torch.tensor(COLOURS[class_id], dtype=torch.float32).view(3, 1)
            assert torch.allclose(rgb[:, selected], expected, atol=1.5), f"class {class_id} misaligned"
    # Padding: label 255 and normalised image 0.
    padded = (pixel_values == 0).all(dim=0)
    assert (labels[padded] == 255).all()
    assert interior.float().mean() > 0.3


def test_train_transform_pads_small_rescales_and_flips():
    image, label = colour_coded_sample()
    transform = SegmentationTrainTransform(photometric=False)
    padded_runs, flips = 0, 0
    for seed in range(10):
        pixel_values, labels = transform.augment(image, label, np.random.default_rng(seed))
        if (labels == 255).all(dim=0).any():
            padded_runs += 1
            padded_columns = (labels == 255).all(dim=0)
            assert (pixel_values[:, :, padded_columns] == 0).all()
        # Class 4 sits top-left in the source: on a flipped crop it is right of class 1 in its rows.
        rows = (labels == 4).any(dim=1)
        if rows.any():
            columns_4 = (labels[rows] == 4).nonzero()[:, 1].float().mean()
            columns_1 = (labels[rows] == 1).nonzero()[:, 1].float().mean() if (labels[rows] == 1).any() else None
            if columns_1 is not None and columns_4 > columns_1:
                flips += 1
    assert padded_runs > 0 and flips > 0


def test_random_crop_prefers_crops_below_the_class_ratio():
    # Left half class 0, right half class 1: a 512 crop of a 512 x 1024 map is below 75 % iff its offset is in
    # (128, 384), about half of the offsets.
    label = np.zeros((512, 1024), np.uint8)
    label[:, 512:] = 1
    label[:10] = 255

    def largest_share(box):
        top, bottom, left, right = box
        ids, counts = np.unique(label[top:bottom, left:right], return_counts=True)
        counts = counts[ids != 255]
        return counts.max() / counts.sum()

    shares = [largest_share(random_crop_box(label, (512, 512), np.random.default_rng(seed))) for seed in range(30)]
    assert all(share < 0.75 for share in shares)
    unconstrained = [
        largest_share(random_crop_box(label, (512, 512), np.random.default_rng(seed), cat_max_ratio=1.0))
        for seed in range(30)
    ]
    assert sum(share >= 0.75 for share in unconstrained) >= 5

    # A single-class map has no valid crop: after 10 re-draws the last box is used.
    uniform = np.zeros((600, 600), np.uint8)
    rng = np.random.default_rng(0)
    box = random_crop_box(uniform, (512, 512), rng)
    assert box[1] - box[0] == 512 and box[3] - box[2] == 512
    replay = np.random.default_rng(0)
    draws = [(int(replay.integers(0, 89)), int(replay.integers(0, 89))) for _ in range(11)]
    assert (box[0], box[2]) == draws[-1]


def test_train_transform_is_seeded():
    image, label = colour_coded_sample()
    transform = SegmentationTrainTransform()
    first = transform.augment(image, label, np.random.default_rng(7))
    second = transform.augment(image, label, np.random.default_rng(7))
    other = transform.augment(image, label, np.random.default_rng(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])
    # Two draws from one generator give different augmentations.
    stream = np.random.default_rng(7)
    assert not torch.equal(transform.augment(image, label, stream)[0], transform.augment(image, label, stream)[0])


def test_photometric_distortion_does_not_change_the_geometry():
    image, label = colour_coded_sample()
    plain = SegmentationTrainTransform(photometric=False).augment(image, label, np.random.default_rng(3))
    distorted = SegmentationTrainTransform(photometric=True).augment(image, label, np.random.default_rng(3))
    assert torch.equal(plain[1], distorted[1])


class ScriptedGenerator:
    """Stands in for np.random.Generator with scripted draws, to check the order of the photometric steps."""

    def __init__(self, integers, uniforms):
        self._integers, self._uniforms = list(integers), list(uniforms)

    def integers(self, *args):
        return self._integers.pop(0)

    def uniform(self, *args):
        return self._uniforms.pop(0)


def test_photometric_distortion_order_and_ranges():
    image = np.array([[[100, 150, 200], [10, 250, 30]]], np.uint8)
    # brightness on (+20), mode 0 (contrast last), saturation off, hue off, contrast on (x2, clipped).
    rng = ScriptedGenerator(integers=[1, 0, 0, 0, 1], uniforms=[20.0, 2.0])
    np.testing.assert_array_equal(photometric_distortion(image, rng), [[[240, 255, 255], [60, 255, 100]]])
    # mode 1: contrast first (x0.5, truncated), then brightness would not apply again.
    rng = ScriptedGenerator(integers=[0, 1, 1, 0, 0], uniforms=[0.5])
    np.testing.assert_array_equal(photometric_distortion(image, rng), [[[50, 75, 100], [5, 125, 15]]])
    # Saturation x1 and a hue shift of 0 leave the image unchanged up to the 8-bit HSV rounding (2-degree hue steps,
    # as OpenCV's), applied twice here.
    rng = ScriptedGenerator(integers=[0, 0, 1, 1, 0, 0], uniforms=[1.0])
    assert np.abs(photometric_distortion(image, rng).astype(int) - image).max() <= 6


def test_hsv_round_trip():
    colours = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hsv = _rgb_to_hsv_uint8(colours)
    assert hsv[..., 0].max() < 180
    assert np.abs(_hsv_to_rgb_uint8(hsv).astype(int) - colours).max() <= 4
    np.testing.assert_array_equal(
        _rgb_to_hsv_uint8(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)),
        [[[0, 255, 255], [60, 255, 255], [120, 255, 255]]],
    )


def test_image_processor_test_time_resize_normalisation_and_collate():
    """The reference's test-time preprocessing (now the image processor's): short side 512, aspect ratio kept,
    mmcv rounding, normalised with the reference's 0-255 statistics."""
    wide = (np.zeros((30, 45, 3), np.uint8), np.ones((30, 45), np.uint8))
    tall = (np.full((40, 20, 3), 255, np.uint8), np.full((40, 20), 255, np.uint8))
    image_processor = CLIPRCImageProcessor(do_sliding_window=False)
    output = image_processor(images=[wide[0], tall[0]])
    pixel_values = [torch.from_numpy(values) for values in output["pixel_values"]]
    assert pixel_values[0].shape == (3, 512, 768) and pixel_values[0].dtype == torch.float32
    assert pixel_values[1].shape == (3, 1024, 512)
    assert output["image_sizes"].tolist() == [[512, 768], [1024, 512]]
    expected_white = (255 - torch.tensor(REFERENCE_IMAGE_MEAN)) / torch.tensor(REFERENCE_IMAGE_STD)
    assert torch.allclose(pixel_values[1][:, 7, 9], expected_white)
    expected_black = -torch.tensor(REFERENCE_IMAGE_MEAN) / torch.tensor(REFERENCE_IMAGE_STD)
    assert torch.allclose(pixel_values[0][:, 100, 300], expected_black)

    capped = CLIPRCImageProcessor(size={"shortest_edge": 512, "longest_edge": 600}, do_sliding_window=False)
    assert capped(images=[wide[0]], return_tensors="pt")["pixel_values"].shape == (1, 3, 400, 600)
    # mmcv rounds half up: 13 * 0.5 = 6.5 -> 7 (Python's round and int() both give 6).
    rounding = CLIPRCImageProcessor(size={"shortest_edge": 5}, do_sliding_window=False)
    assert rounding(images=[np.zeros((10, 13, 3), np.uint8)])["image_sizes"].tolist() == [[5, 7]]

    labels = [torch.from_numpy(label.astype(np.int64)) for label in (wide[1], tall[1])]
    examples = [{"pixel_values": pixel_values[i], "labels": labels[i]} for i in range(2)]
    batch = collate_fn(examples)
    assert isinstance(batch["pixel_values"], list) and len(batch["pixel_values"]) == 2
    stacked = collate_fn([examples[0], examples[0]])
    assert stacked["pixel_values"].shape == (2, 3, 512, 768) and stacked["labels"].shape == (2, 30, 45)


def test_augmented_samples_are_decoded_and_reproducible_in_dataloader_workers(tmp_path):
    make_voc_tree(tmp_path)
    dataset = load_segmentation_dataset(tmp_path / "VOCdevkit", splits="train")["train"]
    samples = AugmentedTrainSamples(dataset, SegmentationTrainTransform(crop_size=32, scale=(128, 32)), seed=0)
    sample = samples[(0, 0, 0)]
    assert sample["pixel_values"].shape == (3, 32, 32)
    # Decoded and remapped VOC ids (t1 holds 255, 0 and 14), never raw ids such as 15.
    assert set(sample["labels"].unique().tolist()) <= {0, 14, 255}

    def run(seed):
        samples = AugmentedTrainSamples(dataset, SegmentationTrainTransform(crop_size=24, scale=(96, 24)), seed=seed)
        keys = [(index, 0, index) for index in range(len(dataset))]
        loader = torch.utils.data.DataLoader(samples, sampler=keys, batch_size=2, num_workers=2, collate_fn=collate_fn)
        return [batch["pixel_values"] for batch in loader]

    first, second, reseeded = run(5), run(5), run(6)
    assert len(first) >= 2 and first[0].shape == (2, 3, 24, 24)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, reseeded))
