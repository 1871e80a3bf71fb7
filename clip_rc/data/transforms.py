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
"""The reference (mmsegmentation) training augmentation for CLIP-RC.

[`SegmentationTrainTransform`] is the reference training pipeline (mmsegmentation 0.x semantics: `Resize` with
`img_scale=(2048, 512)` and `ratio_range=(0.5, 2.0)`, `RandomCrop(512, cat_max_ratio=0.75)`, `RandomFlip(0.5)`,
`PhotoMetricDistortion`, `Normalize`, `Pad(512)`); the test-time resize, normalisation and sliding windows are the
image processor's (`CLIPRCImageProcessor`). The transform takes a batch dict (`image`, `label` lists) and returns
`pixel_values` float tensors `(3, H, W)` and `labels` long tensors `(H, W)`; [`collate_fn`] batches them for a
`torch.utils.data.DataLoader`. Resizing uses `torch.nn.functional.interpolate` without antialiasing (bilinear with
half-pixel centres for images, nearest for labels), which is what OpenCV's `INTER_LINEAR` / `INTER_NEAREST` used by
mmcv compute; the HSV conversions of the photometric distortion follow OpenCV's 8-bit convention (hue in [0, 180)).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..image_processing_clip_rc import get_rescaled_size, resize_image_array, resize_label_array
from .loading import as_rgb_image, scale_to_8_bits


__all__ = [
    "REFERENCE_IMAGE_MEAN",
    "REFERENCE_IMAGE_STD",
    "AugmentedTrainSamples",
    "SegmentationTrainTransform",
    "collate_fn",
    "photometric_distortion",
    "random_crop_box",
]

# ImageNet statistics on 0-255 RGB, as the reference's `img_norm_cfg` (not CLIP's statistics).
REFERENCE_IMAGE_MEAN = (123.675, 116.28, 103.53)
REFERENCE_IMAGE_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation primitives (mmsegmentation semantics, numpy arrays in HWC uint8 RGB / HW uint8 labels)
# ----------------------------------------------------------------------------------------------------------------


def _as_arrays(image: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (H, W) uint8 label map from PIL images or arrays. 16-bit images are scaled to
    8 bits; other pixel types, and label values that do not fit 8 bits, are refused (never wrapped around)."""
    if isinstance(image, PIL.Image.Image):
        image = as_rgb_image(image, "image")
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = scale_to_8_bits(image)
    elif image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or (image.size and not 0 <= image.min() <= image.max() <= 255):
            raise ValueError(
                f"Expected 8-bit pixel values (uint8, uint16 scaled to 8 bits, or integers in [0, 255]), got an "
                f"array of dtype {image.dtype}" + (f" in [{image.min()}, {image.max()}]." if image.size else ".")
            )
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image of shape (H, W, 3), got an array of shape {image.shape}.")
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"Expected a label map of shape (H, W), got an array of shape {label.shape}.")
    if image.shape[:2] != label.shape:
        raise ValueError(f"Image {image.shape[:2]} and label map {label.shape} differ in size.")
    if label.dtype != np.uint8 and label.size and not 0 <= int(label.min()) <= int(label.max()) <= 255:
        raise ValueError(f"Label values must lie in [0, 255], got [{int(label.min())}, {int(label.max())}].")
    return image, label.astype(np.uint8, copy=False)


def random_crop_box(
    label: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
    max_tries: int = 10,
) -> tuple[int, int, int, int]:
    """
    Random crop box with mmsegmentation's `RandomCrop(cat_max_ratio)` rule.

    A box of `crop_size` (clipped to the image) is drawn uniformly; while the box's most frequent class covers
    `cat_max_ratio` or more of its labelled (non-`ignore_index`) pixels, or the box holds fewer than two classes, a
    new box is drawn, `max_tries` times at most. As in mmsegmentation, the box drawn after the last failed try is
    used as is.

    Args:
        label (`np.ndarray` of shape `(H, W)`):
            Label map of the image to crop.
        crop_size (`tuple[int, int]`):
            `(height, width)` of the crop.
        rng (`np.random.Generator`):
            Source of randomness.

    Returns:
        `tuple[int, int, int, int]`: `(top, bottom, left, right)`, to slice `[top:bottom, left:right]`.
    """
    height, width = label.shape
    margin_h, margin_w = max(height - crop_size[0], 0), max(width - crop_size[1], 0)

    def draw() -> tuple[int, int, int, int]:
        top, left = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        return top, top + crop_size[0], left, left + crop_size[1]

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            top, bottom, left, right = box
            ids, counts = np.unique(label[top:bottom, left:right], return_counts=True)
            counts = counts[ids != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _rgb_to_hsv_uint8(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> HSV uint8 with OpenCV's 8-bit ranges (H in [0, 180), S and V in [0, 255])."""
    rgb = image.astype(np.float32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, delta * 255.0 / np.maximum(value, 1e-6), 0.0)
    safe_delta = np.maximum(delta, 1e-6)
    hue = np.where(
        value == red,
        60.0 * (green - blue) / safe_delta,
        np.where(value == green, 120.0 + 60.0 * (blue - red) / safe_delta, 240.0 + 60.0 * (red - green) / safe_delta),
    )
    hue = np.where(delta > 0, hue, 0.0)
    hue = np.where(hue < 0, hue + 360.0, hue)
    hue = np.round(hue / 2.0) % 180
    return np.stack([hue, np.round(saturation), value], axis=-1).astype(np.uint8)


def _hsv_to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Inverse of `_rgb_to_hsv_uint8`."""
    hsv = image.astype(np.float32)
    hue, saturation, value = hsv[..., 0] * 2.0 / 60.0, hsv[..., 1] / 255.0, hsv[..., 2]
    sector = np.floor(hue)
    fraction = hue - sector
    sector = sector.astype(np.int64) % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    red = np.choose(sector, [value, q, p, p, t, value])
    green = np.choose(sector, [t, value, value, q, p, p])
    blue = np.choose(sector, [p, p, t, value, value, q])
    return np.clip(np.round(np.stack([red, green, blue], axis=-1)), 0, 255).astype(np.uint8)


def _scale_and_shift(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """`image * alpha + beta`, clipped to [0, 255] and truncated to uint8 (mmseg's `PhotoMetricDistortion.convert`)."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """
    mmsegmentation's `PhotoMetricDistortion` on an RGB uint8 image `(H, W, 3)`.

    In order, each with probability 0.5: brightness (add a uniform offset in `±brightness_delta`); contrast
    (multiply by a uniform factor in `contrast_range`) here if the random mode is 1; saturation (scale HSV
    saturation); hue (shift HSV hue by an integer in `[-hue_delta, hue_delta)`, modulo 180); contrast here if the
    mode is 0. The random draws happen in the same order as in mmsegmentation.
    """
    if rng.integers(2):
        image = _scale_and_shift(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        image = _scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = _rgb_to_hsv_uint8(image)
        hsv[..., 1] = _scale_and_shift(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = _hsv_to_rgb_uint8(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv_uint8(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        image = _hsv_to_rgb_uint8(hsv)
    if not contrast_first and rng.integers(2):
        image = _scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    return image


def _normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 `(image - mean) / std` on the 0-255 scale."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_tensor) / std_tensor


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SegmentationTrainTransform:
    """
    The reference training augmentation of one sample ([`augment`], drawing from the generator it is given; see
    [`AugmentedTrainSamples`] for a dataset of augmented samples).

    Per sample, with mmsegmentation's semantics: (1) rescale keeping the aspect ratio to fit
    `(scale[0] * r, scale[1] * r)` with `r ~ U(ratio_range)` (long side <= long target, short side <= short target;
    image bilinear, label nearest); (2) random `crop_size` crop, re-drawn up to 10 times until the most frequent class
    covers less than `cat_max_ratio` of the crop's labelled pixels; (3) horizontal flip with probability `flip_prob`;
    (4) photometric distortion (see [`photometric_distortion`]); (5) normalise with `image_mean` / `image_std` on
    0-255 RGB; (6) pad bottom / right to `crop_size` (image 0 after normalisation, label `ignore_index`).

    Args:
        crop_size (`int` or `tuple[int, int]`, *optional*, defaults to 512):
            `(height, width)` of the crops and of the padded output.
        scale (`tuple[int, int]`, *optional*, defaults to `(2048, 512)`):
            mmsegmentation's `img_scale`: the (long, short) sizes the random ratio multiplies.
        ratio_range (`tuple[float, float]`, *optional*, defaults to `(0.5, 2.0)`):
            Range of the random rescale ratio.
        cat_max_ratio (`float`, *optional*, defaults to 0.75):
            Largest share of the crop's labelled pixels a single class may cover (1.0 disables the rule).
        flip_prob (`float`, *optional*, defaults to 0.5):
            Probability of a horizontal flip.
        photometric (`bool`, *optional*, defaults to `True`):
            Whether to apply the photometric distortion (the geometric draws do not depend on it).
        image_mean (`tuple[float, float, float]`, *optional*, defaults to `REFERENCE_IMAGE_MEAN`):
            Per-channel mean on the 0-255 scale.
        image_std (`tuple[float, float, float]`, *optional*, defaults to `REFERENCE_IMAGE_STD`):
            Per-channel standard deviation on the 0-255 scale.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of unlabelled and padded pixels.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        image_mean: Sequence[float] = REFERENCE_IMAGE_MEAN,
        image_std: Sequence[float] = REFERENCE_IMAGE_STD,
        ignore_index: int = 255,
    ):
        self.crop_size = _pair(crop_size)
        self.scale = (max(scale), min(scale))
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.ignore_index = ignore_index

    def augment(self, image: Any, label: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Augment one sample.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): RGB image `(H, W, 3)` (or grayscale `(H, W)`).
            label (`PIL.Image.Image` or `np.ndarray`): label map `(H, W)` of train ids, `ignore_index` = ignore.
            rng (`np.random.Generator`): source of randomness.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: normalised `pixel_values` float32 `(3, crop_h, crop_w)` and
            `labels` int64 `(crop_h, crop_w)`.
        """
        image, label = _as_arrays(image, label)

        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        target_long, target_short = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        new_size = get_rescaled_size(*label.shape, shortest_edge=target_short, longest_edge=target_long)
        image, label = resize_image_array(image, new_size), resize_label_array(label, new_size)

        top, bottom, left, right = random_crop_box(
            label, self.crop_size, rng, cat_max_ratio=self.cat_max_ratio, ignore_index=self.ignore_index
        )
        image, label = image[top:bottom, left:right], label[top:bottom, left:right]

        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]

        if self.photometric:
            image = photometric_distortion(image, rng)

        pixel_values = torch.zeros((3, *self.crop_size), dtype=torch.float32)
        labels = torch.full(self.crop_size, self.ignore_index, dtype=torch.int64)
        height, width = label.shape
        pixel_values[:, :height, :width] = _normalize(image, self.image_mean, self.image_std)
        labels[:height, :width] = torch.from_numpy(label.astype(np.int64))
        return pixel_values, labels


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Collate transformed samples for a `torch.utils.data.DataLoader`.

    Tensors of a key are stacked when they all have the same shape (training crops: `pixel_values` `(B, 3, H, W)`,
    `labels` `(B, H, W)`); otherwise (evaluation images of different sizes) the key holds a list of tensors, one per
    sample. Non-tensor values are gathered in lists.
    """
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        same_shape = all(torch.is_tensor(value) and value.shape == values[0].shape for value in values)
        batch[key] = torch.stack(values) if same_shape else values
    return batch


class AugmentedTrainSamples(torch.utils.data.Dataset):
    """
    Training samples addressed by `(index, epoch, position)` keys: decoded by the dataset's decoder, augmented by a
    [`SegmentationTrainTransform`] drawing from a generator seeded with `(seed, epoch, position)`, so that a sample's
    augmentation depends on neither the process nor the `DataLoader` worker that draws it.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, transform: SegmentationTrainTransform, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        index, epoch, position = key
        sample = self.dataset[int(index)]
        rng = np.random.default_rng([self.seed, epoch, position])
        pixel_values, labels = self.transform.augment(sample["image"], sample["label"], rng)
        return {"pixel_values": pixel_values, "labels": labels}
