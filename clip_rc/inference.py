"""The one inference path of CLIP-RC, as the evaluation and prediction commands use it.

`processor(images)` (resize, sliding windows) -> `model(**inputs)` (window logits) ->
`image_processor.post_process_semantic_segmentation(outputs, target_sizes)` (averaged calibrated scores, resized,
arg-max). This module adds only what the commands share around it: loading a model folder with its processor, and
encoding class names given at run time.
"""

import os
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from transformers import AutoModelForSemanticSegmentation, AutoTokenizer
from transformers.utils import logging

from .image_processing_clip_rc import CLIPRCImageProcessor
from .processing_clip_rc import CLIPRCProcessor
from .utils import check_model_folder, non_finite_tensors


logger = logging.get_logger(__name__)

__all__ = ["encode_class_names", "load_model_and_processor", "segment_images"]


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    processor_name_or_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    allow_missing_weights: bool = False,
) -> tuple[torch.nn.Module, CLIPRCImageProcessor, Any]:
    """
    Load a CLIP-RC model with its image processor and tokenizer, refusing what would segment silently wrong: a local
    folder is checked first (config.json, complete weight files; errors name the file), a weight the checkpoint lacks
    (it would be freshly initialised) is an error unless `allow_missing_weights`, and non-finite weights are refused.

    The model loads through `AutoModelForSemanticSegmentation` (a local folder saved by this package resolves once
    `clip_rc` is imported; a Hub id with custom code needs `trust_remote_code=True`). The image processor and
    tokenizer are read from `processor_name_or_path` (default: the model's folder / id); without a saved image
    processor, the model config's (short side and windows of its crop size) is used.

    Returns:
        `(model, image_processor, tokenizer)`: the model in eval mode on `device`; `tokenizer` is `None` when none
        is found (the model then segments with its own persisted classes only).
    """
    source = os.fspath(model_name_or_path)
    if os.path.isdir(source):
        check_model_folder(source)
    model, loading_info = AutoModelForSemanticSegmentation.from_pretrained(
        source, trust_remote_code=trust_remote_code, output_loading_info=True
    )
    if getattr(model.config, "model_type", None) != "clip_rc":
        raise ValueError(f"{model_name_or_path} holds a {type(model).__name__}, not a CLIP-RC model.")
    missing = sorted(loading_info["missing_keys"])
    if missing and not allow_missing_weights:
        raise ValueError(
            f"{model_name_or_path} lacks {len(missing)} weight(s), which would be randomly initialised: "
            f"{missing[:10]}. Pass allow_missing_weights (--allow_missing_weights) to use the model anyway."
        )
    non_finite = non_finite_tensors(model.state_dict())
    if non_finite:
        raise ValueError(f"{model_name_or_path} holds non-finite weights (NaN or inf) in {non_finite[:10]}.")
    model.eval()
    if device is not None:
        model.to(device)
    processor_source = os.fspath(processor_name_or_path) if processor_name_or_path is not None else source
    return model, _image_processor_at(processor_source, model.config), _tokenizer_at(processor_source)


def _image_processor_at(source: str, config) -> CLIPRCImageProcessor:
    try:
        return CLIPRCImageProcessor.from_pretrained(source)
    except OSError:
        logger.info(f"No image processor saved at {source}: using the model config's (crop {config.crop_size}).")
        return CLIPRCImageProcessor.from_model_config(config)


def _tokenizer_at(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        logger.warning(f"No tokenizer found at {source}: only the model's own classes can be used.")
        return None


def encode_class_names(
    model, image_processor, tokenizer, class_names: Sequence[str], templates: Sequence[str] | None = None
) -> torch.Tensor:
    """
    `(C, E)` normalised class embeddings of `class_names`, encoded by the model's text tower: every name in every
    template (default: the model's `config.prompt_templates`), per-template embeddings averaged and renormalised.
    """
    if tokenizer is None:
        raise ValueError(
            "Encoding class names needs the model's tokenizer; none was found beside the model. Pass a processor "
            "(or tokenizer) folder."
        )
    templates = list(templates) if templates else list(model.config.prompt_templates)
    prompts = CLIPRCProcessor(image_processor, tokenizer).tokenize_class_names(
        list(class_names), templates, return_tensors="pt"
    )
    device = model.class_embeddings.device
    return model.clip_rc.encode_class_prompts(prompts["input_ids"].to(device), prompts["attention_mask"].to(device))


@torch.no_grad()
def segment_images(
    model,
    image_processor: CLIPRCImageProcessor,
    images: Sequence[Any],
    target_sizes: Sequence[tuple[int, int]] | None = None,
    text_embeds: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """
    Label maps of `images` (PIL images or arrays of any sizes) with the reference protocol: the processor's windows,
    the model's logits, the processor's post-processing. Maps have the images' own sizes unless `target_sizes` says
    otherwise; values index the model's classes, or `text_embeds`' rows when given.
    """
    inputs = image_processor(images=list(images), return_tensors="pt")
    if target_sizes is None:
        target_sizes = [_image_size(image) for image in images]
    outputs = model(
        pixel_values=inputs["pixel_values"].to(model.class_embeddings.device, model.dtype),
        image_sizes=inputs["image_sizes"],
        text_embeds=text_embeds,
    )
    return image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)


def _image_size(image: Any) -> tuple[int, int]:
    """`(height, width)` of a PIL image; other inputs need explicit target sizes (their channel axis is ambiguous)."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"Pass target_sizes for inputs of type {type(image).__name__} (only PIL images carry a size)."
        )
    return image.height, image.width
