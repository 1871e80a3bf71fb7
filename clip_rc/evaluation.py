"""Scoring a CLIP-RC model on a segmentation split with the reference's test protocol (SPEC §5, §7).

Every image goes through the one inference path: the image processor resizes it so that its short side is the
model's crop size and cuts the sliding windows, the model maps windows to logits, and the image processor's
`post_process_semantic_segmentation` averages the calibrated scores, resizes them to the label's size and takes the
arg-max. Per-class pixel totals are summed over the whole split while scoring ([`SegmentationMetric`]), so IoU is
intersection / union over the set, as `evaluate`'s `mean_iou` computes it; mIoU over the seen and the unseen classes
and their harmonic mean (hIoU) are added. Several processes each score a contiguous shard of the split
(`PartialState.split_between_processes`, no padding, so no image counts twice) and the totals are summed.

[`evaluate_model`] serves `eval.py` and the periodic evaluation during training.
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from .image_processing_clip_rc import CLIPRCImageProcessor
from .inference import encode_class_names
from .metrics import SegmentationMetric, compute_with_evaluate, cross_check, harmonic_mean, nanmean


__all__ = [
    "METRIC_KEYS",
    "EvaluationClasses",
    "MetricsMismatchError",
    "ProcessedSplit",
    "collate_windows",
    "evaluate_model",
    "resolve_classes",
    "with_split_figures",
]

# The keys of `evaluate`'s `mean_iou` plus the zero-shot split figures, in the order of the metrics file.
MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
METRIC_KEYS = MEAN_IOU_KEYS + (
    "mean_iou_seen",
    "mean_iou_unseen",
    "harmonic_iou",
    "seen_class_ids",
    "unseen_class_ids",
)


class MetricsMismatchError(ValueError):
    """The two metric backends disagree (`cross_check_evaluate`); the message names every differing key."""


def with_split_figures(results: Mapping[str, Any], seen_class_ids: Sequence[int], num_labels: int) -> dict[str, Any]:
    """
    `results` (e.g. from `evaluate`'s `mean_iou`) plus the zero-shot figures computed from its `per_category_iou`,
    with the semantics of [`SegmentationMetric.compute`]: `mean_iou_seen`, `mean_iou_unseen`, `harmonic_iou`,
    `seen_class_ids`, `unseen_class_ids`.
    """
    per_category_iou = np.asarray(results["per_category_iou"], dtype=np.float64)
    seen = sorted(int(class_id) for class_id in seen_class_ids)
    unseen = [class_id for class_id in range(num_labels) if class_id not in set(seen)]
    mean_iou_seen, mean_iou_unseen = nanmean(per_category_iou[seen]), nanmean(per_category_iou[unseen])
    return {
        **results,
        "mean_iou_seen": mean_iou_seen,
        "mean_iou_unseen": mean_iou_unseen,
        "harmonic_iou": harmonic_mean(mean_iou_seen, mean_iou_unseen),
        "seen_class_ids": seen,
        "unseen_class_ids": unseen,
    }


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


class ProcessedSplit(torch.utils.data.Dataset):
    """
    Items of an evaluation split (`image`, `label`: train ids, 255 = ignore) through the image processor: the
    sliding windows `pixel_values` `(n, 3, crop, crop)`, `image_sizes` `(1, 2)`, and the label at its own size.
    """

    def __init__(self, dataset, image_processor: CLIPRCImageProcessor, indices: Sequence[int]):
        self.dataset, self.image_processor, self.indices = dataset, image_processor, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item = self.dataset[index]
        inputs = self.image_processor(images=[item["image"]], return_tensors="pt")
        label = torch.from_numpy(np.asarray(item["label"], dtype=np.int64))
        return {**inputs, "labels": label, "index": index}


def collate_windows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows and image sizes of several images concatenated (the model takes any number of windows); labels and
    dataset indices as lists."""
    return {
        "pixel_values": torch.cat([item["pixel_values"] for item in items]),
        "image_sizes": torch.cat([item["image_sizes"] for item in items]),
        "labels": [item["labels"] for item in items],
        "indices": [item["index"] for item in items],
    }


@dataclass
class EvaluationClasses:
    """The classes a split is scored with: their embeddings (`None`: the model's persisted classes, calibrated),
    names and zero-shot split."""

    text_embeds: torch.Tensor | None
    names: list[str]
    seen_class_ids: list[int]


def resolve_classes(model, image_processor, tokenizer=None, class_names=None, seen_class_ids=None, templates=None):
    """The [`EvaluationClasses`]: the model's own unless `class_names` (or `templates`) differ from its config's; they
    are then encoded with the model's text tower (no calibration; every class seen unless `seen_class_ids` says
    otherwise)."""
    config = model.config
    same_templates = templates is None or list(templates) == list(config.prompt_templates)
    if (class_names is None or list(class_names) == config.class_names) and same_templates:
        seen = config.resolved_seen_class_ids if seen_class_ids is None else list(seen_class_ids)
        return EvaluationClasses(None, config.class_names, seen)
    class_names = config.class_names if class_names is None else list(class_names)
    text_embeds = encode_class_names(model, image_processor, tokenizer, class_names, templates)
    seen = list(range(len(class_names))) if seen_class_ids is None else list(seen_class_ids)
    return EvaluationClasses(text_embeds, list(class_names), seen)


def _score_shard(model, image_processor, loader, classes, metric, keep_maps: bool, on_prediction, bar) -> list:
    """Run the one inference path on this process's shard, adding every prediction to `metric`; returns the
    (prediction, label) maps when the `evaluate` backend needs them."""
    device = model.class_embeddings.device
    maps = []
    for batch in loader:
        outputs = model(
            pixel_values=batch["pixel_values"].to(device, model.dtype),
            image_sizes=batch["image_sizes"],
            text_embeds=classes.text_embeds,
        )
        target_sizes = [tuple(label.shape) for label in batch["labels"]]
        predictions = image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        for index, prediction, label in zip(batch["indices"], predictions, batch["labels"]):
            prediction = prediction.cpu()
            metric.update(prediction, label)
            if keep_maps:
                maps.append((prediction.numpy(), label.numpy()))
            if on_prediction is not None:
                on_prediction(index, prediction, label)
        bar.update(len(predictions))
    return maps


def _evaluate_backend_results(maps, state, classes, ignore_index, metric_path, cross_check_with, atol):
    """`evaluate.load(metric_path)` on every process's maps (on the main process), cross-checked against
    `cross_check_with` when given; the outcome is broadcast so that every process raises the same error."""
    gathered = gather_object([maps]) if state.num_processes > 1 else [maps]
    outcome = None
    if state.is_main_process:
        pairs = [pair for process_maps in gathered for pair in process_maps]
        try:
            theirs = compute_with_evaluate(
                [prediction for prediction, _ in pairs], [label for _, label in pairs],
                num_labels=len(classes.names), ignore_index=ignore_index, metric_path=metric_path,
            )  # fmt: skip
            outcome = ("ok", with_split_figures(theirs, classes.seen_class_ids, len(classes.names)))
            if cross_check_with is not None:
                cross_check(cross_check_with, theirs, atol=atol)
        except ValueError as error:
            outcome = ("mismatch", f"`evaluate.load({metric_path!r})` disagrees on {len(pairs)} images: {error}")
        except Exception as error:  # noqa: BLE001 - raised again on every process below, so that none waits forever
            outcome = ("error", f"`evaluate.load({metric_path!r})` failed: {type(error).__name__}: {error}")
    if state.num_processes > 1:
        outcome = broadcast_object_list([outcome], from_process=0)[0]
    kind, payload = outcome
    if kind == "mismatch":
        raise MetricsMismatchError(payload)
    if kind == "error":
        raise RuntimeError(payload)
    return payload


def evaluate_model(
    model,
    dataset,
    *,
    image_processor: CLIPRCImageProcessor | None = None,
    accelerator: Accelerator | None = None,
    classes: EvaluationClasses | None = None,
    batch_size: int = 2,
    num_workers: int = 0,
    max_samples: int | None = None,
    metric_backend: str = "ours",
    evaluate_metric_path: str = "mean_iou",
    cross_check_evaluate: bool = False,
    atol: float = 1e-6,
    on_prediction: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = True,
    description: str = "evaluating",
) -> dict[str, Any]:
    """
    Score a CLIP-RC model on a segmentation split with the reference test protocol. Every process calls it (a
    collective call); each scores a contiguous, unpadded shard of the split, and all get the same figures.

    Args:
        model ([`CLIPRCForSemanticSegmentation`], possibly wrapped by `accelerator.prepare`): put in eval mode for
            the call, its previous mode restored afterwards; inputs go to the device of its class embeddings.
        dataset (`datasets.Dataset` or map-style dataset): items `image` (PIL) and `label` (train ids, 255 =
            ignore), as [`load_segmentation_dataset`] gives them.
        image_processor ([`CLIPRCImageProcessor`], *optional*): default: the one of the model's config.
        classes ([`EvaluationClasses`], *optional*): default: the model's own classes and split.
        batch_size, num_workers: `DataLoader` settings (images per forward pass: all their windows together).
        max_samples (`int`, *optional*): score only the first `max_samples` images.
        metric_backend (`"ours"` or `"evaluate"`), evaluate_metric_path: [`SegmentationMetric`] totals, or
            `evaluate.load(evaluate_metric_path)` on the maps gathered on the main process.
        cross_check_evaluate (`bool`): compute both and raise [`MetricsMismatchError`] if any key differs by more
            than `atol`.
        on_prediction (`Callable[[int, Tensor, Tensor], None]`, *optional*): called with the dataset index, the
            predicted and the reference map (CPU tensors) on the process that scored it.

    Returns:
        `dict[str, Any]`: the keys of `evaluate`'s `mean_iou` (arrays for the per-category figures), `mean_iou_seen`,
        `mean_iou_unseen`, `harmonic_iou`, `seen_class_ids`, `unseen_class_ids`, `class_names`, `num_images`,
        `metric_backend`. Figures are fractions; NaN marks absent classes.
    """
    from tqdm.auto import tqdm

    if metric_backend not in ("ours", "evaluate"):
        raise ValueError(f"metric_backend must be 'ours' or 'evaluate', got {metric_backend!r}.")
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    image_processor = image_processor or CLIPRCImageProcessor.from_model_config(model.config)
    classes = classes or resolve_classes(model, image_processor)
    state = PartialState()
    ignore_index = model.config.ignore_index
    metric = SegmentationMetric(
        len(classes.names), ignore_index, classes.seen_class_ids, classes.names, device=state.device
    )
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if total == 0:
        raise ValueError("The evaluation split is empty.")
    with state.split_between_processes(list(range(total))) as shard:
        split = ProcessedSplit(dataset, image_processor, shard)
    loader = torch.utils.data.DataLoader(
        split, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_windows
    )
    keep_maps = metric_backend == "evaluate" or cross_check_evaluate
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(split), desc=description, unit="img", disable=not (progress and state.is_local_main_process))
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            maps = _score_shard(model, image_processor, loader, classes, metric, keep_maps, on_prediction, bar)
    finally:
        bar.close()
        model.train(was_training)
    results = metric.compute()  # sums the totals over processes: every process must get here
    if keep_maps:
        cross_check_with = results if cross_check_evaluate else None
        theirs = _evaluate_backend_results(
            maps, state, classes, ignore_index, evaluate_metric_path, cross_check_with, atol
        )
        results = theirs if metric_backend == "evaluate" else results
    return {**results, "class_names": classes.names, "num_images": total, "metric_backend": metric_backend}
