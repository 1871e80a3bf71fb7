"""The model card (`README.md`) of a trained CLIP-RC folder, with Hub metadata built by `huggingface_hub`."""

import json
import math
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_clip_rc import CLIPRCConfig


__all__ = ["MODEL_CARD_MARKER", "build_model_card"]

# The first line of the model card after its metadata: a README.md without it is a user's and is never replaced.
MODEL_CARD_MARKER = "<!-- model card written by clip_rc.commands.train -->"

# Run figures reported in the model index: results key -> (metric type, display name).
_REPORTED_METRICS = {
    "mean_iou": ("mean_iou", "mIoU"),
    "mean_iou_seen": ("mean_iou_seen", "mIoU (seen classes)"),
    "mean_iou_unseen": ("mean_iou_unseen", "mIoU (unseen classes)"),
    "harmonic_iou": ("harmonic_iou", "hIoU"),
    "overall_accuracy": ("overall_accuracy", "pixel accuracy"),
}


def _hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository (not a local folder), else `None`."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    return str(name_or_path)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _eval_results(metrics: dict[str, float], dataset_name: str, split: str | None) -> list[EvalResult]:
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Zero-shot semantic segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=display_name,
            metric_value=round(100 * metrics[key], 2),
        )
        for key, (metric_type, display_name) in _REPORTED_METRICS.items()
        if metrics.get(key) is not None and not math.isnan(metrics[key])
    ]


def _card_data(config, recipe, metrics, repo_id, eval_split) -> ModelCardData:
    base_model = _hub_id(recipe.get("clip_model_name_or_path")) or _hub_id(recipe.get("model_name_or_path"))
    dataset = _hub_id(recipe.get("dataset")) or config.benchmark or "custom"
    model_name = repo_id or f"CLIP-RC {config.benchmark or ''} {config.setting}".replace("  ", " ")
    return ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=[dataset],
        metrics=["mean_iou"],
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=["clip-rc", "zero-shot-semantic-segmentation", "custom_code"],
        eval_results=_eval_results(metrics, dataset, eval_split) if metrics else None,
    )


def _body(config: CLIPRCConfig, recipe, metrics, eval_table, name: str) -> str:
    lines = [
        MODEL_CARD_MARKER, "", "# CLIP-RC", "",
        "CLIP-RC (\"Exploring Regional Clues in CLIP for Zero-Shot Semantic Segmentation\", Zhang et al., CVPR 2024), "
        f"trained with `clip_rc.commands.train` in the **{config.setting}** setting on **{config.benchmark}** "
        f"({config.num_labels} classes, {len(config.unseen_class_ids)} unseen).", "",
        "## Use", "",
        "```python", "from transformers import pipeline", "",
        f'segmenter = pipeline("image-segmentation", model="{name}", trust_remote_code=True)',
        'segments = segmenter("image.jpg")  # [{"label", "mask", "score"}, ...]',
        f'zero_shot = pipeline("zero-shot-image-segmentation", model="{name}", trust_remote_code=True)',
        'segments = zero_shot("image.jpg", candidate_labels=["cat", "grass"])', "```", "",
        "## Results", "",
    ]  # fmt: skip
    if metrics:
        lines += [
            "| pAcc | mIoU | mIoU(S) | mIoU(U) | hIoU |", "|---|---|---|---|---|",
            f"| {_percent(metrics.get('overall_accuracy'))} | {_percent(metrics.get('mean_iou'))} | "
            f"{_percent(metrics.get('mean_iou_seen'))} | {_percent(metrics.get('mean_iou_unseen'))} | "
            f"{_percent(metrics.get('harmonic_iou'))} |", "",
        ]  # fmt: skip
        if eval_table:
            lines += ["<details><summary>Per class</summary>", "", "```", eval_table, "```", "", "</details>", ""]
    else:
        lines += ["Not evaluated.", ""]
    lines += ["## Training recipe", "", "Arguments of `clip_rc.commands.train` (resolved defaults included):", "",
              "```json", json.dumps(recipe, indent=2, default=str), "```", ""]  # fmt: skip
    return "\n".join(lines)


def build_model_card(
    config: CLIPRCConfig,
    recipe: dict[str, Any],
    metrics: dict[str, float] | None = None,
    eval_table: str | None = None,
    repo_id: str | None = None,
    eval_split: str | None = None,
) -> ModelCard:
    """
    The model card of a training run: metadata (`base_model` and `datasets` when they are Hub ids, `metrics`,
    `license`, `pipeline_tag`, `library_name`, and a `model-index` of the final evaluation when there is one), how to
    use the folder, the figures and the training recipe.

    Args:
        config: the trained model's config.
        recipe: the run's resolved arguments (`clip_model_name_or_path` / `model_name_or_path`, `dataset`, ...).
        metrics: the final evaluation's figures (fractions), if any.
        eval_table: the per-class table of that evaluation.
        repo_id: the Hub repository the folder is pushed to, if any.
        eval_split: the evaluated split.
    """
    data = _card_data(config, recipe, metrics, repo_id, eval_split)
    name = repo_id or "path/to/this/folder"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(config, recipe, metrics, eval_table, name)}")
