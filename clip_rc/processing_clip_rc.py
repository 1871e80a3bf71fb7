"""Processor for CLIP-RC: the image processor for images, a CLIP tokenizer for class prompts.

This module imports only `transformers`, `torch`, `numpy` and the class-list helpers, so that it ships with a
checkpoint and `AutoProcessor.from_pretrained(..., trust_remote_code=True)` can import it on its own.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .benchmarks import check_class_names, check_templates


DEFAULT_TEMPLATES = ("a photo of a {}",)


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
                Passed to the image processor (e.g. `size`, `do_sliding_window`).

        Returns:
            [`BatchFeature`]: `pixel_values` and `image_sizes` (see [`CLIPRCImageProcessor`]) if images are given;
            `input_ids` and `attention_mask` of shape `(num_classes, num_templates, sequence_length)` if class names
            are given.
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
        check_class_names(class_names)
        templates = self.templates if templates is None else check_templates(templates)
        prompts = [template.format(name) for name in class_names for template in templates]

        if padding == "max_length" and max_length is None:
            model_max_length = self.tokenizer.model_max_length
            # Tokenizers without a configured limit report a huge sentinel value.
            if model_max_length is not None and model_max_length < 10_000:
                max_length = model_max_length
            else:
                padding = "longest"
        encoding = self.tokenizer(prompts, padding="longest", return_tensors="np")
        if max_length is not None:
            _check_prompt_lengths(encoding["attention_mask"], prompts, max_length)
            encoding = self.tokenizer.pad(encoding, padding=padding, max_length=max_length, return_tensors="np")
        shape = (len(class_names), len(templates), -1)
        output = {key: encoding[key].reshape(shape) for key in ("input_ids", "attention_mask")}
        return_tensors = TensorType(return_tensors) if return_tensors is not None else None
        if return_tensors == TensorType.PYTORCH:
            return {key: torch.from_numpy(value.astype(np.int64)) for key, value in output.items()}
        if return_tensors == TensorType.NUMPY:
            return output
        return {key: value.tolist() for key, value in output.items()}

    def post_process_semantic_segmentation(self, *args, **kwargs):
        """The image processor's [`~CLIPRCImageProcessor.post_process_semantic_segmentation`]."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "image_sizes", "input_ids", "attention_mask"]


def _check_prompt_lengths(attention_mask: np.ndarray, prompts: list[str], max_length: int):
    """A prompt longer than the text tower's positions would be truncated (losing its end-of-text token)."""
    lengths = attention_mask.sum(axis=-1)
    too_long = [(prompts[index], int(lengths[index])) for index in np.flatnonzero(lengths > max_length)]
    if too_long:
        prompt, length = too_long[0]
        raise ValueError(
            f"{len(too_long)} class prompt(s) exceed the text tower's {max_length} tokens, e.g. {prompt[:80]!r}... "
            f"({length} tokens): shorten the class name."
        )


CLIPRCProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CLIPRCProcessor", "DEFAULT_TEMPLATES"]
