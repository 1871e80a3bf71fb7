"""`transformers.pipeline` support for CLIP-RC.

Saved CLIP-RC folders declare both pipelines in `config.custom_pipelines` and carry this module, so any process gets
them, whether or not it imports `clip_rc`:

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="path/to/clip-rc", trust_remote_code=True)
segments = segmenter("image.jpg")  # [{"label": "cat", "mask": PIL "L" image of the image's size, "score": 0.71}, ...]

zero_shot = pipeline("zero-shot-image-segmentation", model="path/to/clip-rc", trust_remote_code=True)
segments = zero_shot("image.jpg", candidate_labels=["cat", "dog", "grass"])  # class names given at call time
```

Both run the one inference path: the image processor's resize and sliding windows, the model's window logits, and
the image processor's `post_process_semantic_segmentation` (averaged calibrated scores, resized to the image, arg-max).
Each mask is a binary PIL "L" image (0 / 255) of the input image's size; `score` is the mean sigmoid score of the
class over its mask (before the seen-class calibration). Class names given as `candidate_labels` are encoded by the
model's text tower with its prompt templates (`config.prompt_templates`; `templates=` / `hypothesis_template=`
override them), through the processor's tokenisation; their embeddings are cached per label list. Batches
(`batch_size > 1`) of images of any sizes give the same results as one image at a time.

This module imports only `transformers`, `torch`, `numpy`, `PIL` and the modules saved beside it, so that it loads
as remote code.
"""

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import load_image
from transformers.pipelines.base import Pipeline
from transformers.utils import logging, requires_backends

from .configuration_clip_rc import check_class_names, check_templates, parse_class_names
from .image_processing_clip_rc import CLIPRCImageProcessor
from .processing_clip_rc import CLIPRCProcessor


logger = logging.get_logger(__name__)

ZERO_SHOT_TASK = "zero-shot-image-segmentation"


def is_clip_rc_model(model: Any) -> bool:
    """Whether `model` is a CLIP-RC segmentation model (also when loaded as remote code, from another module)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "clip_rc" and hasattr(model, "decode_head")


def as_label_list(candidate_labels: str | list[str]) -> list[str]:
    """Candidate labels as a checked list; a string is split at commas."""
    if isinstance(candidate_labels, str):
        return list(parse_class_names(candidate_labels, field="candidate_labels"))
    return list(check_class_names(list(candidate_labels), field="candidate_labels"))


class CLIPRCSegmentationPipeline(Pipeline):
    """
    Semantic segmentation with a CLIP-RC model: the model's own classes (its persisted class embeddings, with the
    reference's calibration of the trained classes), or `candidate_labels` given at call time.

    Returns, per image, one `{"label", "mask", "score"}` dict per predicted class (ascending class id).
    """

    # A CLIP-RC checkpoint segments its own classes without a tokenizer, and gets the processor of its config when
    # none is saved beside it.
    _load_processor = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        requires_backends(self, "vision")
        if not is_clip_rc_model(self.model):
            raise ValueError(f"{type(self).__name__} needs a CLIP-RC model, got {type(self.model).__name__}.")
        if self.image_processor is None:
            self.image_processor = CLIPRCImageProcessor.from_model_config(self.model.config)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    def _sanitize_parameters(
        self, candidate_labels=None, templates=None, hypothesis_template=None, timeout=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"Unexpected arguments for a CLIP-RC segmentation pipeline: {sorted(kwargs)}.")
        forward_params, postprocess_params = {}, {}
        if candidate_labels is not None:
            forward_params["candidate_labels"] = postprocess_params["candidate_labels"] = as_label_list(
                candidate_labels
            )
        templates = templates if templates is not None else hypothesis_template
        if templates is not None:
            forward_params["templates"] = list(check_templates(templates))
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None) -> dict[str, torch.Tensor]:
        image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt")
        return {
            "pixel_values": inputs["pixel_values"].to(self.dtype),
            "image_sizes": inputs["image_sizes"],
            "target_size": torch.tensor([[image.height, image.width]]),
        }

    def _class_embeddings(self, labels: list[str], templates: list[str] | None) -> torch.Tensor:
        templates = templates or list(self.model.config.prompt_templates)
        key = (tuple(labels), tuple(templates))
        if key not in self._text_cache:
            if self.tokenizer is None:
                raise ValueError(
                    "candidate_labels need the model's tokenizer, and none was found beside the model: pass "
                    "tokenizer= (or processor=) to pipeline(...)."
                )
            prompts = CLIPRCProcessor(self.image_processor, self.tokenizer).tokenize_class_names(
                labels, templates, return_tensors="pt"
            )
            self._text_cache[key] = self.model.clip_rc.encode_class_prompts(
                prompts["input_ids"].to(self.device), prompts["attention_mask"].to(self.device)
            )
        return self._text_cache[key]

    def _forward(self, model_inputs, candidate_labels=None, templates=None):
        text_embeds = self._class_embeddings(candidate_labels, templates) if candidate_labels is not None else None
        image_sizes = model_inputs["image_sizes"]
        outputs = self.model(
            pixel_values=model_inputs["pixel_values"], image_sizes=image_sizes, text_embeds=text_embeds
        )
        # One output per image, so that batches split back into images.
        window_counts = self.image_processor.windows_per_image(image_sizes)
        per_image = [
            type(outputs)(
                logits=logits, image_sizes=image_sizes[index : index + 1], score_offsets=outputs.score_offsets
            )
            for index, logits in enumerate(outputs.logits.split(window_counts))
        ]
        return {"outputs": per_image, "target_size": model_inputs["target_size"]}

    def postprocess(self, model_outputs, candidate_labels=None) -> list[dict[str, Any]]:
        outputs = model_outputs["outputs"]
        outputs = outputs[0] if isinstance(outputs, list) else outputs
        result = self.image_processor.post_process_semantic_segmentation(
            outputs, target_sizes=model_outputs["target_size"].reshape(1, 2), return_segmentation_scores=True
        )[0]
        class_names = candidate_labels if candidate_labels is not None else self.model.config.class_names
        # Scores before the calibration of the trained classes.
        raw_scores = result.segmentation_scores + outputs.score_offsets.to(result.segmentation_scores)[:, None, None]
        segments = []
        for class_id in torch.unique(result.segmentation).tolist():
            selected = result.segmentation == class_id
            mask = PIL.Image.fromarray(selected.cpu().numpy().astype(np.uint8) * 255)
            score = float(raw_scores[class_id][selected].mean())
            segments.append({"score": score, "label": class_names[class_id], "mask": mask})
        return segments


class CLIPRCZeroShotSegmentationPipeline(CLIPRCSegmentationPipeline):
    """
    Zero-shot semantic segmentation with a CLIP-RC model: `pipe(image, candidate_labels=["cat", "dog"])` segments
    into the given class names (encoded with the model's text tower and prompt templates); without
    `candidate_labels` the model's own classes are used. Returns the same `{"label", "mask", "score"}` lists as the
    `"image-segmentation"` task.
    """

    def __call__(self, inputs=None, candidate_labels=None, **kwargs):
        """
        Args:
            inputs (`str`, `PIL.Image.Image` or a list of them): image(s) (paths, URLs or PIL images).
            candidate_labels (`list[str]` or comma-separated `str`, *optional*): class names to segment into.
            templates / hypothesis_template (*optional*): prompt template(s) with one `{}`.
        """
        if candidate_labels is not None:
            kwargs["candidate_labels"] = candidate_labels
        return super().__call__(inputs, **kwargs)


__all__ = ["CLIPRCSegmentationPipeline", "CLIPRCZeroShotSegmentationPipeline", "ZERO_SHOT_TASK"]
