"""Images and file names the data loaders meet in the wild: 16-bit and 32-bit pixels, non-UTF-8 file names and
decompression bombs give a correct result or an error naming the file (issue 13, items 5, 9 and 12)."""

import os
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from clip_rc.data import SegmentationDecoder, SegmentationTrainTransform, load_segmentation_dataset

from .test_data import make_coco_tree, make_voc_tree


# 16-bit values and the 8-bit values they must become: round(v * 255 / 65535).
SIXTEEN_BIT = np.array([[0, 257, 32896, 65535], [128, 129, 1000, 65278]], dtype=np.uint16)
EIGHT_BIT = np.array([[0, 1, 128, 255], [0, 1, 4, 254]], dtype=np.uint8)


def pair_dataset(tmp_path: Path, image: PIL.Image.Image, name: str) -> datasets.Dataset:
    """A one-sample dataset of file paths: `image` saved as `name` and an all-zero label map."""
    image_path, label_path = tmp_path / name, tmp_path / "label.png"
    image.save(image_path)
    PIL.Image.fromarray(np.zeros((image.height, image.width), np.uint8)).save(label_path)
    return datasets.Dataset.from_dict({"image": [str(image_path)], "label": [str(label_path)]})


# ---- bit depth ----------------------------------------------------------------------------------------------------


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    dataset = load_segmentation_dataset(pair_dataset(tmp_path, PIL.Image.fromarray(SIXTEEN_BIT), "deep.png"))
    assert PIL.Image.open(tmp_path / "deep.png").mode == "I;16"  # what PIL opens, and would clip to 255
    image = dataset["train"][0]["image"]
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], EIGHT_BIT)


def identity_augment(image, label):
    """The training transform with every random step fixed to identity (scale 1, whole image, no flip, no
    photometric distortion, no normalisation): its output pixels are its 8-bit input."""
    height, width = np.asarray(label).shape
    transform = SegmentationTrainTransform(
        crop_size=(height, width), scale=(max(height, width), min(height, width)), ratio_range=(1.0, 1.0),
        cat_max_ratio=1.0, flip_prob=0.0, photometric=False, image_mean=(0, 0, 0), image_std=(1, 1, 1),
    )  # fmt: skip
    return transform.augment(image, label, np.random.default_rng(0))


def test_16_bit_arrays_are_scaled_and_other_pixel_types_refused():
    label = np.zeros(SIXTEEN_BIT.shape, np.uint8)
    pixel_values, _ = identity_augment(np.repeat(SIXTEEN_BIT[..., None], 3, axis=-1), label)
    np.testing.assert_array_equal(pixel_values[0].numpy(), EIGHT_BIT)
    pixel_values, _ = identity_augment(PIL.Image.fromarray(SIXTEEN_BIT), label)  # a 16-bit PIL image too
    np.testing.assert_array_equal(pixel_values[1].numpy(), EIGHT_BIT)
    # Integers in [0, 255] of a wider type are fine; floats and out-of-range integers are never wrapped around.
    pixel_values, _ = identity_augment(np.full((2, 4, 3), 200, np.int64), label)
    assert bool((pixel_values == 200).all())
    for bad in (np.full((2, 4, 3), 0.5, np.float32), np.full((2, 4, 3), 300, np.int32)):
        with pytest.raises(ValueError, match=f"got an array of dtype {bad.dtype}"):
            identity_augment(bad, label)
    with pytest.raises(ValueError, match=r"Label values must lie in \[0, 255\], got \[0, 300\]"):
        identity_augment(np.zeros((2, 4, 3), np.uint8), np.array([[0, 300, 1, 2], [0, 0, 0, 0]]))


def test_32_bit_float_pixels_are_refused_naming_the_file(tmp_path):
    image = PIL.Image.fromarray(SIXTEEN_BIT.astype(np.float32))
    dataset = load_segmentation_dataset(pair_dataset(tmp_path, image, "float.tif"))
    path = re.escape(str(tmp_path / "float.tif"))
    with pytest.raises(ValueError, match=f"The image file {path} has 32-bit floating-point pixels"):
        dataset["train"][0]


# ---- file names ---------------------------------------------------------------------------------------------------


def test_a_split_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    voc = make_voc_tree(tmp_path)
    split_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    split_file.write_bytes(b"v1\ncaf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match=f"Line 2 of split file {re.escape(str(split_file))} is not valid UTF-8"):
        load_segmentation_dataset(tmp_path / "VOCdevkit", splits="val")


def test_a_file_name_that_is_not_utf8_in_a_coco_tree_is_named(tmp_path):
    """(POSIX file names are bytes; a Latin-1 name decodes to lone surrogates that pyarrow cannot store.)"""
    make_coco_tree(tmp_path)
    images, annotations = tmp_path / "images" / "val2017", tmp_path / "annotations" / "val2017"
    latin1_stem = b"caf\xe9"
    image_bytes = (images / "000000000001.jpg").read_bytes()
    label_bytes = (annotations / "000000000001_labelTrainIds.png").read_bytes()
    with open(os.fsencode(images) + b"/" + latin1_stem + b".jpg", "wb") as handle:
        handle.write(image_bytes)
    with open(os.fsencode(annotations) + b"/" + latin1_stem + b"_labelTrainIds.png", "wb") as handle:
        handle.write(label_bytes)
    with pytest.raises(ValueError, match=r"The file name of .*caf\\xe9\.jpg is not valid UTF-8") as raised:
        load_segmentation_dataset(tmp_path, splits="val")
    assert str(images) in str(raised.value)
    str(raised.value).encode("utf-8")  # the message itself prints anywhere


# ---- decompression bombs ------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    dataset = load_segmentation_dataset(pair_dataset(tmp_path, PIL.Image.new("RGB", (64, 64)), "bomb.png"))
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS (89 million by default) and warns above it; a small
    # limit makes a 64x64 image play the part.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    path = re.escape(str(tmp_path / "bomb.png"))
    with pytest.raises(ValueError, match=f"Refusing to decode image file {path}: .*4096 pixels.*MAX_IMAGE_PIXELS"):
        dataset["train"][0]
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 3000)
    with CaptureLogger(logging.get_logger("clip_rc.data")) as captured:
        assert dataset["train"][0]["image"].size == (64, 64)
    assert f"image file {tmp_path / 'bomb.png'}: Image size (4096 pixels) exceeds limit" in captured.out
    assert SegmentationDecoder().decode_image(str(tmp_path / "bomb.png")).size == (64, 64)
