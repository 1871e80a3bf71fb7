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
"""`transformers.pipeline` support for CLIP-RC.

After `import clip_rc` (which calls [`register_pipelines`]):

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="path/to/clip-rc")  # the model's own classes
segments = segmenter("image.jpg")  # [{"label": "cat", "mask": PIL "L" image of the image's size, "score": 0.71}, ...]

zero_shot = pipeline("zero-shot-image-segmentation", model="path/to/clip-rc")
segments = zero_shot("image.jpg", candidate_labels=["cat", "dog", "grass"])  # class names given at call time
```

Why a pipeline class of our own: the stock `ImageSegmentationPipeline` runs `model(**image_processor(image))` once on
the whole resized image and then `post_process_semantic_segmentation`. CLIP-RC's forward only takes inputs whose
sides are multiples of `patch_size * region_grid_size` (the region-token attention mask needs whole cells) and the
reference protocol is a sliding window over the image with calibrated, averaged scores, so the stock path either
fails or gives other predictions. [`CLIPRCSegmentationPipeline`] subclasses `ImageSegmentationPipeline`: for CLIP-RC
models it segments with [`~CLIPRCForSemanticSegmentation.sliding_window_scores`] (short side resized to the crop size,
sliding windows, scores resized to the image size, argmax); for every other model each method defers to the stock
implementation unchanged. [`register_pipelines`] installs it as the implementation of the `"image-segmentation"`
task (keeping that task's model classes and default) and registers [`CLIPRCZeroShotSegmentationPipeline`] under the
new task `"zero-shot-image-segmentation"` (CLIP-RC models only) with `PIPELINE_REGISTRY.register_pipeline`.
Passing `pipeline_class=CLIPRCSegmentationPipeline` to `pipeline(...)` works as well, without the registration.

Each mask is a binary PIL "L" image (0 / 255) of the input image's size; `score` is the mean sigmoid score of the
class over its mask (before the seen-class calibration). Class names given as `candidate_labels` are encoded by the
model's text tower with its prompt templates (`config.prompt_templates`; `templates=` / `hypothesis_template=`
override them) through the tokenizer saved beside the model; their embeddings are cached per label list.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.base import Pipeline
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.utils import logging, requires_backends


try:
    from PIL import Image

    from transformers.image_utils import load_image
except ImportError:  # pragma: no cover - PIL is a dependency of the package
    Image = None

from .benchmarks import check_templates
from .modeling_clip_rc import tokenize_class_prompts
from .processing_clip_rc import CLIPRCImageProcessor, CLIPRCProcessor


logger = logging.get_logger(__name__)

__all__ = [
    "CLIPRCSegmentationPipeline",
    "CLIPRCZeroShotSegmentationPipeline",
    "ZERO_SHOT_TASK",
    "register_pipelines",
]

ZERO_SHOT_TASK = "zero-shot-image-segmentation"


def is_clip_rc_model(model: Any) -> bool:
    """Whether `model` is a CLIP-RC model (also when loaded as remote code, from another module)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clip_rc" and hasattr(model, "sliding_window_scores")


def _components_beside(model) -> tuple[Any, Any]:
    """(image processor, tokenizer) saved beside a CLIP-RC model, as far as they can be found."""
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if source:
        try:
            processor = CLIPRCProcessor.from_pretrained(source)
            return processor.image_processor, processor.tokenizer
        except Exception:  # noqa: BLE001 - no processor there: the caller falls back to defaults
            pass
        try:
            return CLIPRCImageProcessor.from_pretrained(source), None
        except Exception:  # noqa: BLE001
            pass
    return None, None


def _as_label_list(candidate_labels) -> list[str] | None:
    if candidate_labels is None:
        return None
    if isinstance(candidate_labels, str):
        candidate_labels = candidate_labels.split(",")
    labels = [str(label).strip() for label in candidate_labels if str(label).strip()]
    if not labels:
        raise ValueError("candidate_labels must hold at least one class name.")
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"candidate_labels repeats {duplicated}.")
    return labels


def _as_templates(templates) -> list[str] | None:
    if templates is None:
        return None
    return list(check_templates(templates))


class CLIPRCSegmentationPipeline(ImageSegmentationPipeline):
    """
    Image segmentation pipeline that segments CLIP-RC models with the reference's sliding-window protocol and defers
    to the stock `ImageSegmentationPipeline` for every other model.

    For CLIP-RC models it returns, per image, one `{"label", "mask", "score"}` dict per predicted class (ascending
    class id): `mask` a binary PIL "L" image of the input's size, `score` the mean sigmoid score of the class over its
    mask. Call-time arguments (CLIP-RC models only): `candidate_labels` (class names encoded with the model's text
    tower instead of its own classes), `templates` (prompt templates for them), `windows_per_batch`.
    """

    # The image processor and tokenizer are optional: a CLIP-RC checkpoint segments its own classes without a
    # tokenizer, and gets a default image processor (short side = crop size) when none is saved beside it.
    _load_processor = False
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        self._is_clip_rc = is_clip_rc_model(model)
        if not self._is_clip_rc:
            super().__init__(*args, **kwargs)
            if self.image_processor is None:
                raise ValueError(
                    "Impossible to guess which image processor to use. Please provide a PreTrainedImageProcessor "
                    "class or a path/identifier to a pretrained image processor."
                )
            return
        # The stock constructor would report the (registered, but not built-in) CLIP-RC class as unsupported.
        Pipeline.__init__(self, *args, **kwargs)
        requires_backends(self, "vision")
        self._text_cache: dict[tuple, torch.Tensor] = {}
        if self.image_processor is None or self.tokenizer is None:
            image_processor, tokenizer = _components_beside(self.model)
            self.image_processor = self.image_processor or image_processor
            self.tokenizer = self.tokenizer or tokenizer
        if self.image_processor is None:
            crop = self.model.config.crop_size
            self.image_processor = CLIPRCImageProcessor(
                size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}
            )
        elif type(self.image_processor).__name__ != "CLIPRCImageProcessor":
            logger.warning(
                f"The image processor is a {type(self.image_processor).__name__}, not a CLIPRCImageProcessor: CLIP-RC "
                "expects the short side resized to its crop size and ImageNet normalisation."
            )

    # ---- parameters ------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, **kwargs):
        clip_rc_kwargs = {
            key: kwargs.pop(key)
            for key in ("candidate_labels", "templates", "hypothesis_template", "windows_per_batch")
            if key in kwargs
        }
        preprocess_kwargs, forward_kwargs, postprocess_kwargs = super()._sanitize_parameters(**kwargs)
        if not clip_rc_kwargs:
            return preprocess_kwargs, forward_kwargs, postprocess_kwargs
        if not getattr(self, "_is_clip_rc", is_clip_rc_model(getattr(self, "model", None))):
            raise ValueError(f"{sorted(clip_rc_kwargs)} are only supported for CLIP-RC models.")
        if "candidate_labels" in clip_rc_kwargs:
            preprocess_kwargs["candidate_labels"] = _as_label_list(clip_rc_kwargs["candidate_labels"])
        templates = clip_rc_kwargs.get("templates", clip_rc_kwargs.get("hypothesis_template"))
        if templates is not None:
            preprocess_kwargs["templates"] = _as_templates(templates)
        if "windows_per_batch" in clip_rc_kwargs:
            forward_kwargs["windows_per_batch"] = int(clip_rc_kwargs["windows_per_batch"])
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    # ---- steps -----------------------------------------------------------------------------------------------

    def preprocess(self, image, subtask=None, timeout=None, candidate_labels=None, templates=None):
        if not self._is_clip_rc:
            return super().preprocess(image, subtask=subtask, timeout=timeout)
        if subtask not in (None, "semantic"):
            raise ValueError(f"CLIP-RC only does semantic segmentation, got subtask={subtask!r}.")
        image = load_image(image, timeout=timeout)
        processor_kwargs = {}
        if isinstance(self.image_processor, CLIPRCImageProcessor) or (
            type(self.image_processor).__name__ == "CLIPRCImageProcessor"
        ):
            processor_kwargs["size"] = {"shortest_edge": self.model.config.crop_size}
        inputs = self.image_processor(images=[image], return_tensors="pt", **processor_kwargs)
        return {
            "pixel_values": inputs["pixel_values"].to(self.dtype),
            "target_size": (image.height, image.width),
            "candidate_labels": candidate_labels,
            "templates": templates,
        }

    def _class_embeddings(self, labels: list[str], templates: list[str] | None) -> torch.Tensor:
        templates = templates or list(self.model.config.prompt_templates)
        key = (tuple(labels), tuple(templates))
        if key not in self._text_cache:
            if self.tokenizer is None:
                raise ValueError(
                    "candidate_labels need the model's tokenizer, and none was found beside the model: pass "
                    "tokenizer= to pipeline(...)."
                )
            prompts = tokenize_class_prompts(self.tokenizer, labels, templates)
            self._text_cache[key] = self.model.encode_text(
                prompts["input_ids"].to(self.device), prompts["attention_mask"].to(self.device)
            )
        return self._text_cache[key]

    def _forward(self, model_inputs, windows_per_batch: int = 4):
        if not self._is_clip_rc:
            return super()._forward(model_inputs)
        labels, templates = model_inputs.pop("candidate_labels"), model_inputs.pop("templates")
        config = self.model.config
        if labels is None:
            text_embeds, class_names = None, config.class_names
            offsets = self.model.score_offsets(
                torch.arange(config.num_labels, device=self.device), config.num_labels, self.device
            )
        else:
            text_embeds, class_names = self._class_embeddings(labels, templates), labels
            offsets = torch.zeros(len(labels), device=self.device)
        scores = self.model.sliding_window_scores(
            model_inputs["pixel_values"],
            text_embeds=text_embeds,
            output_size=model_inputs["target_size"],
            windows_per_batch=windows_per_batch,
        )
        return {"scores": scores, "offsets": offsets, "class_names": class_names}

    def postprocess(
        self, model_outputs, subtask=None, threshold=0.9, mask_threshold=0.5, overlap_mask_area_threshold=0.5
    ):
        if not self._is_clip_rc:
            return super().postprocess(
                model_outputs,
                subtask=subtask,
                threshold=threshold,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
            )
        scores = model_outputs["scores"][0].float()
        probabilities = scores + model_outputs["offsets"].float()[:, None, None]
        segmentation = scores.argmax(dim=0)
        annotation = []
        for class_id in torch.unique(segmentation).tolist():
            selected = segmentation == class_id
            mask = Image.fromarray(selected.numpy().astype(np.uint8) * 255)
            score = float(probabilities[class_id][selected].mean())
            annotation.append({"score": score, "label": model_outputs["class_names"][class_id], "mask": mask})
        return annotation


class CLIPRCZeroShotSegmentationPipeline(CLIPRCSegmentationPipeline):
    """
    Zero-shot semantic segmentation with a CLIP-RC model: `pipe(image, candidate_labels=["cat", "dog"])` segments
    into the given class names (encoded with the model's text tower and prompt templates); without
    `candidate_labels` the model's own classes are used. Returns the same `{"label", "mask", "score"}` lists as the
    `"image-segmentation"` task.
    """

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if not is_clip_rc_model(model):
            raise ValueError(f"{ZERO_SHOT_TASK!r} needs a CLIP-RC model, got {type(model).__name__}.")
        super().__init__(*args, **kwargs)

    def __call__(self, inputs=None, candidate_labels=None, **kwargs):
        """
        Args:
            inputs (`str`, `PIL.Image.Image` or a list of them): image(s) (paths, URLs or PIL images).
            candidate_labels (`list[str]` or comma-separated `str`, *optional*): class names to segment into.
            templates / hypothesis_template (*optional*): prompt template(s) with one `{}`.
        """
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        if candidate_labels is not None:
            kwargs["candidate_labels"] = candidate_labels
        return super().__call__(inputs, **kwargs)


def register_pipelines() -> None:
    """
    Register CLIP-RC with `transformers.pipeline` (idempotent): `"zero-shot-image-segmentation"` becomes a task served
    by [`CLIPRCZeroShotSegmentationPipeline`], and [`CLIPRCSegmentationPipeline`] becomes the implementation of
    `"image-segmentation"` (identical to the stock pipeline for non-CLIP-RC models).
    """
    from transformers import AutoModelForSemanticSegmentation

    if PIPELINE_REGISTRY.supported_tasks.get(ZERO_SHOT_TASK, {}).get("impl") is not CLIPRCZeroShotSegmentationPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            ZERO_SHOT_TASK,
            pipeline_class=CLIPRCZeroShotSegmentationPipeline,
            pt_model=AutoModelForSemanticSegmentation,
            type="multimodal",
        )
    # Swap the implementation of the existing task in place, keeping its model classes, default model and type
    # (`register_pipeline` would warn about overwriting and mark the class as custom code for `save_pretrained`).
    entry = PIPELINE_REGISTRY.supported_tasks["image-segmentation"]
    if entry.get("impl") is not CLIPRCSegmentationPipeline:
        PIPELINE_REGISTRY.supported_tasks["image-segmentation"] = {**entry, "impl": CLIPRCSegmentationPipeline}
