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
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import TensorType

from .configuration_clip_rc import check_class_names, check_templates
from .image_processing_clip_rc import CLIPRCImageProcessorKwargs


DEFAULT_TEMPLATES = ("a photo of a {}",)


class CLIPRCProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: CLIPRCImageProcessorKwargs
    # Prompts padded to the text tower's length, so that a batch of them stacks.
    _defaults = {"text_kwargs": {"padding": "max_length"}}


class CLIPRCProcessor(ProcessorMixin):
    r"""
    CLIP-RC processor: a [`CLIPRCImageProcessor`] for the images and a CLIP tokenizer for text.

    `processor(images=..., text=...)` follows transformers' processor conventions: images go through the image
    processor (resize, sliding windows), text prompts through the tokenizer as they are, each with its own keyword
    arguments (`images_kwargs`, `text_kwargs` or flat). Class names are turned into the model's prompts by
    [`~CLIPRCProcessor.tokenize_class_names`]: every name in every template, tokenised with CLIP's start /
    end-of-text tokens and padded with the pad token, so the end-of-text token stays right after each prompt.

    Args:
        image_processor ([`CLIPRCImageProcessor`]):
            The image processor.
        tokenizer (`CLIPTokenizer` or `CLIPTokenizerFast`):
            The CLIP tokenizer.
        templates (`list[str]`, *optional*, defaults to `["a photo of a {}"]`):
            Prompt templates with one `"{}"` slot for the class name; saved with the processor.
    """

    valid_processor_kwargs = CLIPRCProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, templates: Sequence[str] | None = None, **kwargs):
        self.templates = list(check_templates(DEFAULT_TEMPLATES if templates is None else templates))
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[CLIPRCProcessorKwargs],
    ) -> BatchFeature:
        """
        Prepare images and / or text prompts for the model.

        Args:
            images (`ImageInput`, *optional*):
                One image or a batch (PIL images, arrays, tensors; sizes may differ).
            text (`str` or `list[str]`, *optional*):
                Prompts, tokenised as they are (use [`tokenize_class_names`] for class names and templates).
            kwargs:
                Image processor arguments (e.g. `size`, `do_sliding_window`), tokenizer arguments (e.g. `padding`,
                `max_length`) and `return_tensors`.

        Returns:
            [`BatchFeature`]: `pixel_values` and `image_sizes` (see [`CLIPRCImageProcessor`]) if images are given;
            `input_ids` and `attention_mask` if text is given.
        """
        if images is None and text is None:
            raise ValueError("Pass images, text or both.")
        output_kwargs = self._merge_kwargs(
            CLIPRCProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        data = {}
        if images is not None:
            data.update(self.image_processor(images, **output_kwargs["images_kwargs"]))
        if text is not None:
            data.update(self.tokenizer(text, **output_kwargs["text_kwargs"]))
        return BatchFeature(data=data)

    def tokenize_class_names(
        self,
        class_names: str | Sequence[str],
        templates: Sequence[str] | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> dict[str, Any]:
        """
        Tokenise every (class, template) prompt, padded to the tokenizer's `model_max_length` (77 for CLIP) when it
        is a real limit (otherwise to the longest prompt). A prompt longer than that is an error naming it: it would
        lose its end-of-text token.

        Args:
            class_names (`str` or `Sequence[str]`): class names, in class-id order.
            templates (`Sequence[str]`, *optional*): prompt templates; defaults to the processor's `templates`.
            return_tensors (`str` or `TensorType`, *optional*): `"pt"`, `"np"` or `None` (lists).

        Returns:
            `dict`: `input_ids` and `attention_mask` of shape `(num_classes, num_templates, sequence_length)`, as
            [`CLIPRCForSemanticSegmentation`] takes them.
        """
        class_names = [class_names] if isinstance(class_names, str) else list(class_names)
        check_class_names(class_names)
        templates = self.templates if templates is None else check_templates(templates)
        prompts = [template.format(name) for name in class_names for template in templates]
        encoding = self.tokenizer(prompts, padding="longest", return_tensors="np")
        model_max_length = self.tokenizer.model_max_length
        # Tokenizers without a configured limit report a huge sentinel value.
        if model_max_length is not None and model_max_length < 10_000:
            _check_prompt_lengths(encoding["attention_mask"], prompts, model_max_length)
            encoding = self.tokenizer.pad(
                encoding, padding="max_length", max_length=model_max_length, return_tensors="np"
            )
        shape = (len(class_names), len(templates), -1)
        output = {key: encoding[key].reshape(shape) for key in ("input_ids", "attention_mask")}
        return_tensors = TensorType(return_tensors) if return_tensors is not None else None
        if return_tensors == TensorType.PYTORCH:
            return {key: torch.from_numpy(value.astype(np.int64)) for key, value in output.items()}
        if return_tensors == TensorType.NUMPY:
            return output
        return {key: value.tolist() for key, value in output.items()}

    def save_pretrained(self, *args, **kwargs):
        saved = super().save_pretrained(*args, **kwargs)
        # Saving code for the Auto classes records `auto_map` on the processor itself; it belongs in the saved file
        # only, so that a processor equals itself reloaded.
        self.__dict__.pop("auto_map", None)
        return saved

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

__all__ = ["CLIPRCProcessor", "CLIPRCProcessorKwargs", "DEFAULT_TEMPLATES"]
