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
"""Image processor and processor (image processor + CLIP tokenizer) for CLIP-RC.

This module only imports `transformers`, `torch`, `numpy` and `PIL`, so that `save_pretrained` can copy it next to a
checkpoint and `AutoProcessor.from_pretrained(..., trust_remote_code=True)` can import it on its own.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType, logging

from .benchmarks import check_templates


logger = logging.get_logger(__name__)

__all__ = [
    "CLIPRCImageProcessor",
    "CLIPRCProcessor",
    "get_rescaled_size",
    "resize_image_array",
    "resize_label_array",
]

DEFAULT_TEMPLATES = ("a photo of a {}",)

_TORCH_MODES = {
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BICUBIC: "bicubic",
}


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
    image: np.ndarray,
    size: tuple[int, int],
    resample: str = "bilinear",
    channels_first: bool = False,
) -> np.ndarray:
    """
    Resize an image without antialiasing (half-pixel centres), as OpenCV's `INTER_LINEAR` used by mmcv.

    Args:
        image (`np.ndarray`):
            `(H, W, C)` image (or `(C, H, W)` with `channels_first=True`); uint8 or float.
        size (`tuple[int, int]`):
            `(new_height, new_width)`.
        resample (`str`, *optional*, defaults to `"bilinear"`):
            `torch.nn.functional.interpolate` mode: `"bilinear"`, `"bicubic"` or `"nearest"`.
        channels_first (`bool`, *optional*, defaults to `False`):
            Whether the channel axis comes first.

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


class CLIPRCImageProcessor(PilBackend):
    r"""
    Test-time image processor of CLIP-RC: rescale so the short side is `size["shortest_edge"]` (aspect ratio kept,
    mmcv rounding, bilinear without antialiasing as the reference's OpenCV resize), rescale to [0, 1], normalise with
    ImageNet statistics (the reference's mean 123.675 / 116.28 / 103.53 and std 58.395 / 57.12 / 57.375 on 0-255
    RGB), channels first. Grayscale, RGBA and palette images are converted to RGB.

    Images keep their aspect ratio, so a batch of differently shaped images gives `pixel_values` as a list of
    `(3, H_i, W_i)` arrays / tensors; a batch of equal-sized images with `return_tensors="pt"` gives one
    `(B, 3, H, W)` tensor. `original_sizes` holds each input's `(height, width)` (a `(B, 2)` long tensor with
    `return_tensors="pt"`), the `target_sizes` that [`~CLIPRCImageProcessor.post_process_semantic_segmentation`]
    expects.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 512}`):
            Target of the resize; may also hold `longest_edge` to cap the long side.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 512, "width": 512}`):
            Training crop and sliding-window size of the model (not applied by this processor).
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resampling filter (`BILINEAR`, `BICUBIC` or `NEAREST`).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1 / 255`):
            Factor bringing 0-255 pixel values to [0, 1].
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` and `image_std`.
        image_mean (`tuple[float, float, float]`, *optional*, defaults to `(0.485, 0.456, 0.406)`):
            Per-channel mean on the [0, 1] scale.
        image_std (`tuple[float, float, float]`, *optional*, defaults to `(0.229, 0.224, 0.225)`):
            Per-channel standard deviation on the [0, 1] scale.
    """

    model_input_names = ["pixel_values"]
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

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Convert one input (PIL, `(H, W)` / `(H, W, C)` / `(C, H, W)` array or tensor) to a `(C, H, W)` array."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray) and image.ndim == 2:
            # Grayscale arrays have no channel axis to infer the layout from.
            image = image[..., None]
            input_data_format = ChannelDimension.LAST
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | None = None,
        **kwargs,
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
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size, resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32, copy=False))

        same_shape = all(image.shape == processed[0].shape for image in processed)
        return_tensors = TensorType(return_tensors) if return_tensors is not None else None
        if return_tensors == TensorType.PYTORCH:
            pixel_values = [torch.from_numpy(np.ascontiguousarray(image)) for image in processed]
            pixel_values = torch.stack(pixel_values) if same_shape else pixel_values
            sizes = torch.tensor(original_sizes, dtype=torch.long)
        elif return_tensors == TensorType.NUMPY:
            pixel_values = np.stack(processed) if same_shape else processed
            sizes = np.array(original_sizes, dtype=np.int64)
        elif return_tensors is None:
            pixel_values, sizes = processed, original_sizes
        else:
            raise ValueError(f"Unsupported return_tensors {return_tensors!r}; use 'pt', 'np' or None.")
        return BatchFeature(data={"pixel_values": pixel_values, "original_sizes": sizes})

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        score_offsets: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """
        Turn CLIP-RC mask logits into one class-id map per image.

        Args:
            outputs (model output with a `logits` attribute, or a tensor):
                `logits` of shape `(batch_size, num_classes, h, w)`: raw per-class mask logits on the patch grid.
            target_sizes (`Sequence[tuple[int, int]]` or `torch.Tensor` of shape `(batch_size, 2)`, *optional*):
                `(height, width)` of each output map, e.g. the processor's `original_sizes`. If unset, the maps keep
                the logits' resolution.
            score_offsets (`torch.Tensor` of shape `(num_classes,)`, *optional*):
                Subtracted from the sigmoid scores before the argmax (the calibration the model defines, e.g. 0.1
                on seen classes in the inductive zero-shot setting).

        Returns:
            `list[torch.Tensor]`: `batch_size` long tensors of shape `(height, width)` holding class ids: the
            argmax over classes of `sigmoid(upsampled logits) - score_offsets`, logits upsampled bilinearly
            (`align_corners=False`).
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is not None:
            if isinstance(target_sizes, torch.Tensor):
                target_sizes = target_sizes.tolist()
            if len(target_sizes) != len(logits):
                raise ValueError(
                    f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits; pass one per image."
                )
        if score_offsets is not None:
            score_offsets = torch.as_tensor(score_offsets, dtype=logits.dtype, device=logits.device)
            if score_offsets.shape != (logits.shape[1],):
                raise ValueError(
                    f"score_offsets must have shape ({logits.shape[1]},) (one per class), got "
                    f"{tuple(score_offsets.shape)}."
                )

        segmentation_maps = []
        for index, image_logits in enumerate(logits):
            if target_sizes is not None:
                image_logits = F.interpolate(
                    image_logits[None], size=tuple(int(side) for side in target_sizes[index]), mode="bilinear",
                    align_corners=False,
                )[0]
            scores = image_logits.sigmoid()
            if score_offsets is not None:
                scores = scores - score_offsets[:, None, None]
            segmentation_maps.append(scores.argmax(dim=0))
        return segmentation_maps


class CLIPRCProcessor(ProcessorMixin):
    r"""
    CLIP-RC processor: a [`CLIPRCImageProcessor`] for the images and a CLIP tokenizer for the class prompts.

    Each class name is put into every prompt template; the prompts are tokenised with CLIP's start / end-of-text
    tokens and padded with the tokenizer's pad token to a common length, so the end-of-text token stays right after
    the last word of each prompt.

    Args:
        image_processor ([`CLIPRCImageProcessor`]):
            The image processor.
        tokenizer (`CLIPTokenizer` or `CLIPTokenizerFast`):
            The CLIP tokenizer.
        templates (`Sequence[str]`, *optional*, defaults to `("a photo of a {}",)`):
            Prompt templates with one `"{}"` slot; saved with the processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, templates: Sequence[str] | None = None, **kwargs):
        self.templates = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        return_tensors: str | TensorType | None = None,
        padding: bool | str = "max_length",
        max_length: int | None = None,
        **images_kwargs,
    ) -> BatchFeature:
        """
        Prepare images and / or class prompts for the model.

        Args:
            images (`ImageInput`, *optional*):
                One image or a batch (PIL images, arrays, tensors; sizes may differ).
            text (`str` or `Sequence[str]`, *optional*):
                Class names, in class-id order.
            templates (`Sequence[str]`, *optional*):
                Prompt templates; defaults to the processor's `templates`.
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"`, `"np"` or `None` (lists).
            padding (`bool` or `str`, *optional*, defaults to `"max_length"`):
                Padding of the prompts: `"max_length"` pads to `max_length`, `"longest"` / `True` to the longest
                prompt.
            max_length (`int`, *optional*):
                Prompt length; defaults to the tokenizer's `model_max_length` (77 for CLIP) when that is a real
                limit, otherwise prompts are padded to the longest one.
            images_kwargs:
                Passed to the image processor (e.g. `size`).

        Returns:
            [`BatchFeature`]: `pixel_values` and `original_sizes` (see [`CLIPRCImageProcessor`]) if images are given;
            `input_ids` and `attention_mask` of shape `(num_classes, num_templates, sequence_length)` if text is given.
        """
        if images is None and text is None:
            raise ValueError("Pass images, text (class names) or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **images_kwargs))
        if text is not None:
            data.update(self.tokenize_class_names(text, templates, return_tensors, padding, max_length))
        return BatchFeature(data=data)

    def tokenize_class_names(
        self,
        class_names: str | Sequence[str],
        templates: Sequence[str] | None = None,
        return_tensors: str | TensorType | None = None,
        padding: bool | str = "max_length",
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """
        Tokenise every (class, template) prompt.

        Returns:
            `dict`: `input_ids` and `attention_mask` of shape `(num_classes, num_templates, sequence_length)`
            (nested lists when `return_tensors` is `None`).
        """
        class_names = [class_names] if isinstance(class_names, str) else list(class_names)
        if not class_names:
            raise ValueError("text must hold at least one class name.")
        templates = self.templates if templates is None else check_templates(templates)
        prompts = [template.format(name) for name in class_names for template in templates]

        if padding == "max_length" and max_length is None:
            model_max_length = self.tokenizer.model_max_length
            # Tokenizers without a configured limit report a huge sentinel value.
            if model_max_length is not None and model_max_length < 10_000:
                max_length = model_max_length
            else:
                padding = "longest"
        encoding = self.tokenizer(
            prompts,
            padding=padding,
            max_length=max_length,
            truncation=max_length is not None,
            return_tensors="np",
        )
        shape = (len(class_names), len(templates), -1)
        output = {key: encoding[key].reshape(shape) for key in ("input_ids", "attention_mask")}
        return_tensors = TensorType(return_tensors) if return_tensors is not None else None
        if return_tensors == TensorType.PYTORCH:
            return {key: torch.from_numpy(value.astype(np.int64)) for key, value in output.items()}
        if return_tensors == TensorType.NUMPY:
            return output
        return {key: value.tolist() for key, value in output.items()}

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is this module's class: going through `AutoImageProcessor` would need the package's
        # registration or `trust_remote_code`, although the class is already at hand.
        subfolder = kwargs.pop("subfolder", "")
        image_processor = CLIPRCImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


CLIPRCImageProcessor.register_for_auto_class("AutoImageProcessor")
CLIPRCProcessor.register_for_auto_class("AutoProcessor")
