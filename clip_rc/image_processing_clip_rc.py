"""Image processor for CLIP-RC: the reference's test-time preprocessing, sliding windows and post-processing.

The reference scores an image by resizing its short side to the crop size, cutting `crop_size` windows every
`sliding_window_stride` pixels, averaging the calibrated sigmoid scores of overlapping windows, resizing the scores
to the original size and taking the arg-max. Here the image processor does the first two steps (`pixel_values` are
the windows, `image_sizes` the resized sizes), the model maps windows to mask logits, and
[`CLIPRCImageProcessor.post_process_semantic_segmentation`] does the rest: the one implementation of the protocol
used by the evaluation, prediction, pipelines and the Python API.

This module imports only `transformers`, `torch`, `numpy` and `PIL`, so that it ships with a checkpoint and loads
with `trust_remote_code` on its own.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging


logger = logging.get_logger(__name__)

_TORCH_MODES = {
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BICUBIC: "bicubic",
}

# Classes whose full-resolution scores are alive at once while label maps are assembled (8 MB in fp32 for a 512 x 512
# map, so that they stay in the processor's caches): memory does not grow with the number of classes.
CLASSES_PER_CHUNK = 8


def get_rescaled_size(
    height: int, width: int, shortest_edge: int | float, longest_edge: int | float | None = None
) -> tuple[int, int]:
    """
    Output size of an aspect-preserving rescale, with mmcv's `imrescale` rounding.

    The scale factor is `shortest_edge / min(height, width)`, lowered to `longest_edge / max(height, width)` when
    `longest_edge` is set and the long side would otherwise exceed it; each side becomes `int(side * factor + 0.5)`.

    Returns:
        `tuple[int, int]`: `(new_height, new_width)`.
    """
    factor = shortest_edge / min(height, width)
    if longest_edge is not None:
        factor = min(factor, longest_edge / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image_array(
    image: np.ndarray, size: tuple[int, int], resample: str = "bilinear", channels_first: bool = False
) -> np.ndarray:
    """
    Resize an image without antialiasing (half-pixel centres), as OpenCV's `INTER_LINEAR` used by mmcv.

    Args:
        image (`np.ndarray`): `(H, W, C)` image (or `(C, H, W)` with `channels_first=True`); uint8 or float.
        size (`tuple[int, int]`): `(new_height, new_width)`.
        resample (`str`, *optional*, defaults to `"bilinear"`): `"bilinear"`, `"bicubic"` or `"nearest"`.
        channels_first (`bool`, *optional*, defaults to `False`): whether the channel axis comes first.

    Returns:
        `np.ndarray`: The resized image, same layout and dtype (uint8 results are rounded and clipped).
    """
    if tuple(size) == (image.shape[-2:] if channels_first else image.shape[:2]):
        return image
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))
    if not channels_first:
        pixels = pixels.permute(2, 0, 1)
    align_corners = None if resample == "nearest" else False
    resized = F.interpolate(pixels[None], size=tuple(size), mode=resample, align_corners=align_corners)[0]
    if not channels_first:
        resized = resized.permute(1, 2, 0)
    if image.dtype == np.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return resized.numpy().astype(image.dtype, copy=False)


def resize_label_array(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a `(H, W)` label map (source pixel `floor(dst * scale)`, as OpenCV)."""
    if tuple(size) == label.shape:
        return label
    values = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))
    resized = F.interpolate(values[None, None], size=tuple(size), mode="nearest")[0, 0]
    return resized.numpy().astype(label.dtype)


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """
    `(top, bottom, left, right)` of the reference's sliding windows over an image padded to at least one crop:
    windows every `stride` pixels, row-major, the last one of a row / column flush with the border.
    """
    height, width = max(height, crop), max(width, crop)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            windows.append((max(bottom - crop, 0), bottom, max(right - crop, 0), right))
    return windows


def _channel_layout(image: np.ndarray | torch.Tensor, input_data_format) -> ChannelDimension:
    """Channels-last for NumPy arrays (as `np.asarray(PIL image)` gives), channels-first for tensors, unless the
    shape or `input_data_format` says otherwise; an error where the shape is ambiguous for a tensor."""
    if input_data_format is not None:
        return ChannelDimension(input_data_format)
    channel_counts = (1, 3, 4)
    first, last = image.shape[0] in channel_counts, image.shape[-1] in channel_counts
    if isinstance(image, torch.Tensor):
        if first and last:
            raise ValueError(
                f"Cannot tell the channel axis of an image tensor of shape {tuple(image.shape)}: pass "
                "input_data_format='channels_first' or 'channels_last'."
            )
        return ChannelDimension.FIRST if first else ChannelDimension.LAST
    return ChannelDimension.LAST if last or not first else ChannelDimension.FIRST


def _to_uint8_range(image: np.ndarray) -> np.ndarray:
    """16-bit images scaled to the 0-255 range the statistics expect (instead of being clipped at 255)."""
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    return image


class CLIPRCImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_sliding_window (`bool`, *optional*, defaults to `self.do_sliding_window`):
        Whether to cut each resized image into `crop_size` windows every `sliding_window_stride` pixels (images
        smaller than the crop are padded to one crop, bottom / right, with the mean colour).
    sliding_window_stride (`int`, *optional*, defaults to `self.sliding_window_stride`):
        Stride of the sliding windows.
    """

    do_sliding_window: bool
    sliding_window_stride: int


class CLIPRCImageProcessor(PilBackend):
    r"""
    Test-time image processor of CLIP-RC, the reference protocol's preprocessing: rescale so that the short side is
    `size["shortest_edge"]` (aspect ratio kept, mmcv rounding, bilinear without antialiasing as the reference's OpenCV
    resize), rescale to [0, 1], normalise with ImageNet statistics (the reference's mean 123.675 / 116.28 / 103.53 and
    std 58.395 / 57.12 / 57.375 on 0-255 RGB), then cut sliding windows of `crop_size` every `sliding_window_stride`
    pixels. Grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB.

    Returns `pixel_values` of shape `(num_windows, 3, crop_height, crop_width)` (every window of every image, image
    by image, row-major) and `image_sizes` `(num_images, 2)`, the resized `(height, width)` of each image, from which
    [`post_process_semantic_segmentation`] finds the windows again. Without sliding windows, `pixel_values` are the
    resized images (a list when their sizes differ).

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 512}`):
            Target of the resize; may also hold `longest_edge` to cap the long side.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 512, "width": 512}`):
            Size of the sliding windows (the model's crop size).
        do_sliding_window (`bool`, *optional*, defaults to `True`):
            Whether to cut sliding windows.
        sliding_window_stride (`int`, *optional*, defaults to 426):
            Stride of the sliding windows.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resampling filter (`BILINEAR`, `BICUBIC` or `NEAREST`).
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, *optional*, defaults to
        `1 / 255`): bring 0-255 pixel values to [0, 1].
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean (defaults to `(0.485, 0.456, 0.406)`),
        image_std (defaults to `(0.229, 0.224, 0.225)`): normalisation on the [0, 1] scale.
    """

    valid_kwargs = CLIPRCImageProcessorKwargs
    model_input_names = ["pixel_values", "image_sizes"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 512}
    default_to_square = False
    crop_size = {"height": 512, "width": 512}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sliding_window = True
    sliding_window_stride = 426

    def __init__(self, **kwargs: Unpack[CLIPRCImageProcessorKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config) -> "CLIPRCImageProcessor":
        """The processor of the reference protocol for a model config: short side, windows and stride of its crop."""
        crop = config.crop_size
        return cls(
            size={"shortest_edge": crop},
            crop_size={"height": crop, "width": crop},
            sliding_window_stride=config.sliding_window_stride,
        )

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One input (PIL image, `(H, W)` / `(H, W, C)` array, `(C, H, W)` tensor) as a `(C, H, W)` array."""
        if isinstance(image, PIL.Image.Image) and image.mode in ("I;16", "I;16B", "I;16L"):
            image = np.asarray(image)
        elif isinstance(image, PIL.Image.Image) and image.mode in ("I", "F"):
            raise ValueError(
                f"Unsupported image mode {image.mode!r} (32-bit): convert it to 8-bit RGB first, so that its values "
                "are on the 0-255 scale the normalisation expects."
            )
        if isinstance(image, (np.ndarray, torch.Tensor)):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            if array.ndim == 2:
                array, input_data_format = array[..., None], ChannelDimension.LAST
            elif array.ndim == 3:
                input_data_format = _channel_layout(image, input_data_format)
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise ValueError("The image holds non-finite values (NaN or inf).")
            image = _to_uint8_range(array)
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

    def resize(
        self, image: np.ndarray, size: SizeDict, resample: PILImageResampling | None = None, **kwargs
    ) -> np.ndarray:
        """Aspect-preserving resize of a `(C, H, W)` array to `size.shortest_edge` (capped by `size.longest_edge`)."""
        resample = PILImageResampling(resample) if resample is not None else PILImageResampling.BILINEAR
        if resample not in _TORCH_MODES:
            raise ValueError(f"Unsupported resample {resample!r}; use one of {list(_TORCH_MODES)}.")
        if size.shortest_edge:
            new_size = get_rescaled_size(*image.shape[-2:], size.shortest_edge, size.longest_edge)
        elif size.height and size.width:
            new_size = (size.height, size.width)
        else:
            raise ValueError(f"size must hold 'shortest_edge' (and optionally 'longest_edge'), got {dict(size)}.")
        return resize_image_array(image, new_size, resample=_TORCH_MODES[resample], channels_first=True)

    def cut_windows(self, image: np.ndarray, crop_size: SizeDict, stride: int) -> np.ndarray:
        """The sliding windows `(num_windows, C, crop_h, crop_w)` of a normalised `(C, H, W)` image, padded (bottom /
        right, zeros: the mean colour after normalisation) to at least one crop."""
        crop = _square_crop(crop_size)
        height, width = image.shape[-2:]
        canvas = np.zeros((image.shape[0], max(height, crop), max(width, crop)), dtype=np.float32)
        canvas[:, :height, :width] = image
        return np.stack(
            [
                canvas[:, top:bottom, left:right]
                for top, bottom, left, right in sliding_windows(height, width, crop, stride)
            ]
        )

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        crop_size: SizeDict,
        do_sliding_window: bool,
        sliding_window_stride: int,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size, resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32, copy=False))
        image_sizes = np.array([image.shape[-2:] for image in processed], dtype=np.int64).reshape(-1, 2)
        if do_sliding_window:
            if sliding_window_stride is None or sliding_window_stride < 1:
                raise ValueError(f"sliding_window_stride must be a positive integer, got {sliding_window_stride!r}.")
            pixel_values = np.concatenate(
                [self.cut_windows(image, crop_size, sliding_window_stride) for image in processed]
            )
        elif all(image.shape == processed[0].shape for image in processed):
            pixel_values = np.stack(processed)
        else:
            pixel_values = processed
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes}, tensor_type=return_tensors
        )

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        The reference protocol's label maps from the model's window logits: for each image, the sigmoid scores of its
        windows (logits upsampled bilinearly to the crop size) averaged where windows overlap, the padding cut away,
        the model's `score_offsets` subtracted, the scores resized (bilinear) to the target size, arg-max over the
        classes (ties to the lowest class). Memory does not grow with the number of classes (they are scored
        `CLASSES_PER_CHUNK` at a time with a running maximum) unless the scores are asked for.

        Args:
            outputs ([`CLIPRCSemanticSegmenterOutput`]): `logits` `(num_windows, C, h, w)` of the windows this
                processor cut, `image_sizes` `(num_images, 2)`, `score_offsets` `(C,)`.
            target_sizes (`Sequence[tuple[int, int]]` or `torch.Tensor` of shape `(num_images, 2)`, *optional*):
                `(height, width)` of each output map, e.g. the original image sizes. Default: the resized sizes.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`):
                Also return the calibrated scores `(C, height, width)` of every class.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` long tensor of class indices per image; or, with
            `return_segmentation_scores=True`, one `SemanticSegmentationPostProcessorOutput` per image with
            `segmentation` and `segmentation_scores`.
        """
        logits, image_sizes, offsets, target_sizes = self._check_post_process_inputs(outputs, target_sizes)
        crop, stride = _square_crop(self.crop_size), self.sliding_window_stride
        results, first_window = [], 0
        for image_size, target_size in zip(image_sizes, target_sizes):
            windows = sliding_windows(*image_size, crop, stride)
            window_logits = logits[first_window : first_window + len(windows)]
            first_window += len(windows)
            if return_segmentation_scores:
                scores = calibrated_scores(window_logits, windows, image_size, crop, offsets, target_size)
                results.append(
                    SemanticSegmentationPostProcessorOutput(
                        data={"segmentation": scores.argmax(dim=0), "segmentation_scores": scores}
                    )
                )
            else:
                results.append(
                    image_label_map(window_logits.detach(), windows, image_size, crop, offsets, target_size)
                )
        return results

    def windows_per_image(self, image_sizes: Sequence[tuple[int, int]] | torch.Tensor) -> list[int]:
        """How many sliding windows this processor cuts from images of the given resized `(height, width)`."""
        crop = _square_crop(self.crop_size)
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        return [
            len(sliding_windows(int(height), int(width), crop, self.sliding_window_stride)) for height, width in sizes
        ]

    def _check_post_process_inputs(self, outputs, target_sizes):
        """Logits, image sizes, offsets and target sizes as lists of `(height, width)`, checked against each other
        and against this processor's windows."""
        logits, image_sizes = outputs.logits, outputs.image_sizes
        if image_sizes is None:
            raise ValueError("outputs.image_sizes is missing: pass the processor's `image_sizes` to the model.")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("The model returned non-finite logits (NaN or inf): its weights or inputs hold them.")
        image_sizes = [tuple(int(side) for side in size) for size in torch.as_tensor(image_sizes).tolist()]
        offsets = getattr(outputs, "score_offsets", None)
        offsets = torch.zeros(logits.shape[1]) if offsets is None else offsets
        num_windows = sum(self.windows_per_image(image_sizes))
        if num_windows != logits.shape[0]:
            raise ValueError(
                f"The logits hold {logits.shape[0]} crops, but image_sizes {image_sizes} give {num_windows} sliding "
                f"windows of {dict(self.crop_size)} every {self.sliding_window_stride} pixels: run the model on this "
                "processor's pixel_values (do_sliding_window=True)."
            )
        if target_sizes is None:
            target_sizes = image_sizes
        else:
            target_sizes = target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else list(target_sizes)
            if len(target_sizes) != len(image_sizes):
                raise ValueError(f"Got {len(target_sizes)} target sizes for {len(image_sizes)} images.")
            target_sizes = [tuple(int(side) for side in size) for size in target_sizes]
        return logits, image_sizes, offsets.to(logits.device, torch.float32), target_sizes


def _square_crop(crop_size: SizeDict | dict) -> int:
    crop_size = crop_size if isinstance(crop_size, SizeDict) else SizeDict(**crop_size)
    if crop_size.height != crop_size.width:
        raise ValueError(f"CLIP-RC crops are square, got crop_size {dict(crop_size)}.")
    return crop_size.height


def window_average_scores(
    window_logits: torch.Tensor, windows, canvas_size: tuple[int, int], crop: int
) -> torch.Tensor:
    """Sigmoid scores `(c, *canvas_size)` of a class range, from its window logits `(n, c, h, w)` upsampled to the
    crop size, averaged where windows overlap."""
    upsampled = F.interpolate(window_logits.float(), size=(crop, crop), mode="bilinear", align_corners=False)
    probabilities = upsampled.sigmoid_()
    if len(windows) == 1:  # the canvas is the one window: its scores are the average, no canvas needed
        return probabilities[0]
    scores = upsampled.new_zeros(window_logits.shape[1], *canvas_size)
    counts = upsampled.new_zeros(1, *canvas_size)
    for window_scores, (top, bottom, left, right) in zip(probabilities, windows):
        scores[:, top:bottom, left:right] += window_scores
        counts[:, top:bottom, left:right] += 1
    return scores.div_(counts)


def calibrated_scores(window_logits, windows, image_size, crop, offsets, target_size) -> torch.Tensor:
    """The calibrated scores `(c, *target_size)` of one image for a class range: window scores averaged, padding cut,
    `offsets` (c,) subtracted (`None`: all zero), resized (bilinear) from the resized `image_size` to `target_size`."""
    canvas_size = (max(image_size[0], crop), max(image_size[1], crop))
    scores = window_average_scores(window_logits, windows, canvas_size, crop)[:, : image_size[0], : image_size[1]]
    if offsets is not None:
        scores = scores.sub_(offsets[:, None, None])
    if tuple(target_size) != tuple(image_size):
        scores = F.interpolate(scores[None], size=tuple(target_size), mode="bilinear", align_corners=False)[0]
    return scores


def image_label_map(window_logits, windows, image_size, crop, offsets, target_size) -> torch.Tensor:
    """The label map `(*target_size)` of one image: the classes scored `CLASSES_PER_CHUNK` at a time, each class
    folded into a running maximum (ties to the lowest class, as `argmax`; a reduction over the class axis is several
    times slower on CPU)."""
    offsets = offsets if bool(offsets.any()) else None
    best_scores = torch.full(tuple(target_size), -torch.inf, device=window_logits.device)
    labels = torch.zeros(tuple(target_size), dtype=torch.long, device=window_logits.device)
    improved = torch.empty(tuple(target_size), dtype=torch.bool, device=window_logits.device)
    for first in range(0, window_logits.shape[1], CLASSES_PER_CHUNK):
        chunk = slice(first, first + CLASSES_PER_CHUNK)
        chunk_offsets = offsets[chunk] if offsets is not None else None
        scores = calibrated_scores(window_logits[:, chunk], windows, image_size, crop, chunk_offsets, target_size)
        for index, class_scores in enumerate(scores, start=first):
            torch.gt(class_scores, best_scores, out=improved)
            torch.maximum(best_scores, class_scores, out=best_scores)
            labels.masked_fill_(improved, index)
    return labels


CLIPRCImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CLIPRCImageProcessor",
    "get_rescaled_size",
    "resize_image_array",
    "resize_label_array",
    "sliding_windows",
]
