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
"""Zero-shot semantic segmentation evaluation of CLIP-RC models (`eval.py`, `clip-rc-eval`).

The reference test protocol (SPEC §5, §7): every image is resized so that its short side is the model's crop size
(512 in the reference), scored with sliding windows (`crop_size` / `sliding_window_stride`, 512 / 426) by
[`~CLIPRCForSemanticSegmentation.sliding_window_scores`] (calibrated sigmoid scores averaged over the windows), the
scores are resized (bilinear) to the original size and the argmax is compared with the label map. Per-class pixel
totals are summed over the whole split while scoring ([`SegmentationMetric`]), so IoU is intersection / union over the
set, as `evaluate`'s `mean_iou` computes it; mIoU over the seen and the unseen classes and their harmonic mean (hIoU)
are added.

Several processes (`accelerate launch --num_processes N eval.py ...`) each score a contiguous shard of the split
(`PartialState.split_between_processes`, no padding, so no image counts twice) and the totals are summed across
processes before the figures are computed.

```bash
python eval.py --model runs/voc-inductive --data_root data/VOCdevkit --output_dir runs/voc-inductive/eval
accelerate launch --num_processes 2 eval.py --model runs/coco-inductive --data_root data/VOCdevkit \
    --class_names_from voc --output_dir runs/coco-on-voc
```

[`evaluate_model`] is the same scoring as a function, for periodic evaluation during training.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from .benchmarks import BENCHMARKS, get_benchmark
from .data import (
    REFERENCE_IMAGE_MEAN,
    REFERENCE_IMAGE_STD,
    SegmentationEvalTransform,
    collate_fn,
    installed_decoder,
    load_segmentation_dataset,
    with_segmentation_transform,
)
from .metrics import (
    SegmentationMetric,
    compute_with_evaluate,
    cross_check,
    format_results_table,
    harmonic_mean,
    nanmean,
)
from .utils import json_ready, launched_without_accelerator, setup_logging, write_json_atomic
from .predict import class_palette, encode_class_names, load_model_and_processor, overlay_label_map


logger = hf_logging.get_logger("clip_rc.evaluation")

__all__ = [
    "METRIC_KEYS",
    "MetricsMismatchError",
    "evaluate_model",
    "json_ready",
    "main",
    "with_split_figures",
    "write_json_atomic",
]

# The keys of `evaluate`'s `mean_iou` plus the zero-shot split figures, in the order of the metrics file.
MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
METRIC_KEYS = MEAN_IOU_KEYS + (
    "mean_iou_seen", "mean_iou_unseen", "harmonic_iou", "seen_class_ids", "unseen_class_ids",
)


class MetricsMismatchError(ValueError):
    """The two metric backends disagree (`cross_check_evaluate`); the message names every differing key."""


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def with_split_figures(results: Mapping[str, Any], seen_class_ids: Sequence[int], num_labels: int) -> dict[str, Any]:
    """
    `results` (e.g. from `evaluate`'s `mean_iou`) plus the zero-shot figures computed from its `per_category_iou`,
    with the semantics of [`SegmentationMetric.compute`]: `mean_iou_seen`, `mean_iou_unseen`, `harmonic_iou`,
    `seen_class_ids`, `unseen_class_ids`.
    """
    per_category_iou = np.asarray(results["per_category_iou"], dtype=np.float64)
    seen = sorted(int(class_id) for class_id in seen_class_ids)
    unseen = [class_id for class_id in range(num_labels) if class_id not in set(seen)]
    mean_iou_seen = nanmean(per_category_iou[seen])
    mean_iou_unseen = nanmean(per_category_iou[unseen])
    output = dict(results)
    output.update(
        {
            "mean_iou_seen": mean_iou_seen,
            "mean_iou_unseen": mean_iou_unseen,
            "harmonic_iou": harmonic_mean(mean_iou_seen, mean_iou_unseen),
            "seen_class_ids": seen,
            "unseen_class_ids": unseen,
        }
    )
    return output


class _TransformedDataset(torch.utils.data.Dataset):
    """Applies a batch transform (dict of lists) to the items of a map-style dataset, one item at a time."""

    def __init__(self, dataset, transform: Callable[[dict], dict]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        output = self.transform({key: [value] for key, value in item.items()})
        return {key: values[0] for key, values in output.items()}


def _prepare_split(dataset, crop_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
    """The split with the evaluation transform (short side = crop size, normalisation) unless it already yields
    `pixel_values` / `labels`."""
    if len(dataset) == 0:
        raise ValueError("The evaluation split is empty.")
    keys = set(dataset[0].keys())
    if {"pixel_values", "labels"} <= keys:
        return dataset
    if not {"image", "label"} <= keys:
        raise ValueError(f"Evaluation samples need `image` and `label` (or `pixel_values` and `labels`), got {keys}.")
    transform = SegmentationEvalTransform(shortest_edge=crop_size, image_mean=image_mean, image_std=image_std)
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            return with_segmentation_transform(dataset, transform)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return _TransformedDataset(dataset, transform)


@torch.no_grad()
def _segment_batch(
    model,
    pixel_values: Sequence[torch.Tensor],
    output_sizes: Sequence[tuple[int, int]],
    text_embeds: torch.Tensor | None,
    windows_per_batch: int,
) -> list[torch.Tensor]:
    """Label maps of a batch; images of the same (resized) size share one `sliding_window_labels` call."""
    device = model.class_embeddings.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, pixels in enumerate(pixel_values):
        groups.setdefault(tuple(pixels.shape), []).append(position)
    predictions: list[torch.Tensor | None] = [None] * len(pixel_values)
    for members in groups.values():
        stacked = torch.stack([pixel_values[position] for position in members]).to(device=device, dtype=model.dtype)
        sizes = [tuple(int(side) for side in output_sizes[position]) for position in members]
        label_maps = model.sliding_window_labels(
            stacked, text_embeds=text_embeds, output_sizes=sizes, windows_per_batch=windows_per_batch
        )
        for position, label_map in zip(members, label_maps):
            predictions[position] = label_map
    return predictions


def _as_list(values) -> list[torch.Tensor]:
    return list(values.unbind(0)) if isinstance(values, torch.Tensor) else list(values)


def _gather_to_main(items: list, state) -> list | None:
    """All processes' lists concatenated (in process order) on the main process; `None` elsewhere."""
    if state.num_processes == 1 or not torch.distributed.is_initialized():
        return items
    gathered = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(items, gathered, dst=0)
    if not state.is_main_process:
        return None
    return [item for process_items in gathered for item in process_items]


def _broadcast_from_main(value: Any, state) -> Any:
    if state.num_processes == 1 or not torch.distributed.is_initialized():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def evaluate_model(
    model,
    dataset,
    *,
    accelerator=None,
    text_embeds: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    seen_class_ids: Sequence[int] | None = None,
    tokenizer=None,
    templates: Sequence[str] | None = None,
    batch_size: int = 2,
    num_workers: int = 0,
    max_samples: int | None = None,
    image_mean: Sequence[float] = REFERENCE_IMAGE_MEAN,
    image_std: Sequence[float] = REFERENCE_IMAGE_STD,
    ignore_index: int | None = None,
    windows_per_batch: int = 4,
    metric_backend: str = "ours",
    evaluate_metric_path: str = "mean_iou",
    cross_check_evaluate: bool = False,
    atol: float = 1e-6,
    on_prediction: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = True,
    description: str = "evaluating",
) -> dict[str, Any]:
    """
    Score a CLIP-RC model on a segmentation split with the reference test protocol.

    Every process calls it (the totals are summed across processes; a collective call). Each process scores a
    contiguous, unpadded shard of the split, so every image counts once.

    Args:
        model ([`CLIPRCForSemanticSegmentation`], possibly wrapped by `accelerator.prepare`):
            The model; it is put in eval mode for the call and its previous mode restored afterwards. Inputs go to
            the device of its class embeddings.
        dataset (`datasets.Dataset` or map-style dataset):
            A split from [`load_segmentation_dataset`] (items `image` / `label`: PIL images of train ids, 255 =
            ignore), or a split that already yields evaluation `pixel_values` `(3, h, w)` and original-size `labels`.
            Raw splits get [`SegmentationEvalTransform`] with `shortest_edge = model.config.crop_size`.
        accelerator (`accelerate.Accelerator`, *optional*):
            Used to unwrap the model; sharding and reduction follow the process group of `accelerate`'s state.
        text_embeds (`torch.Tensor` of shape `(C, E)`, *optional*):
            Class embeddings to score with (no seen-class calibration, as for any class list given at run time).
        class_names (`Sequence[str]`, *optional*):
            Names of the scored classes. Without `text_embeds`, names that differ from the model's own classes are
            encoded with `tokenizer` and `templates` (default: the model's `prompt_templates`).
        seen_class_ids (`Sequence[int]`, *optional*):
            The seen classes for mIoU(S) / mIoU(U) / hIoU. Default: the model's split for its own classes, every
            class otherwise.
        tokenizer (*optional*): CLIP tokenizer, needed only to encode `class_names`.
        templates (`Sequence[str]`, *optional*): prompt templates for `class_names`.
        batch_size (`int`, defaults to 2), num_workers (`int`, defaults to 0): `DataLoader` settings; images of the
            same resized size in a batch are scored together.
        max_samples (`int`, *optional*): score only the first `max_samples` images.
        image_mean, image_std (0-255 scale, default: the reference's ImageNet statistics): normalisation of raw
            splits.
        ignore_index (`int`, *optional*): label of unscored pixels (default `model.config.ignore_index`, 255).
        windows_per_batch (`int`, defaults to 4): sliding windows per forward pass.
        metric_backend (`str`, defaults to `"ours"`): `"ours"` ([`SegmentationMetric`] totals) or `"evaluate"`
            (the predicted and reference maps gathered on the main process and scored by
            `evaluate.load(evaluate_metric_path)`; the split figures are added from its `per_category_iou`).
        evaluate_metric_path (`str`, defaults to `"mean_iou"`): Hub id or local metric folder for `evaluate`.
        cross_check_evaluate (`bool`, defaults to `False`): compute both backends and raise
            [`MetricsMismatchError`] (on every process) if any `mean_iou` key differs by more than `atol`.
        on_prediction (`Callable[[int, Tensor, Tensor], None]`, *optional*): called on the process that scored it
            with the dataset index, the predicted `(H, W)` map and the reference map (CPU tensors).
        progress (`bool`, defaults to `True`), description (`str`): tqdm bar (on the local main process).

    Returns:
        `dict[str, Any]`, identical on every process: the keys of `evaluate`'s `mean_iou` (`mean_iou`,
        `mean_accuracy`, `overall_accuracy`, `per_category_iou`, `per_category_accuracy` as `np.ndarray`), plus
        `mean_iou_seen`, `mean_iou_unseen`, `harmonic_iou`, `seen_class_ids`, `unseen_class_ids`, `class_names`,
        `num_images` and `metric_backend`. Figures are fractions in [0, 1]; NaN marks absent classes / empty splits.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if metric_backend not in ("ours", "evaluate"):
        raise ValueError(f"metric_backend must be 'ours' or 'evaluate', got {metric_backend!r}.")
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    model = getattr(model, "module", model)
    config = model.config
    state = PartialState()
    ignore_index = config.ignore_index if ignore_index is None else ignore_index

    # The classes to score with.
    if text_embeds is None and class_names is not None and list(class_names) != config.class_names:
        text_embeds = encode_class_names(model, tokenizer, class_names, templates)
    if text_embeds is None:
        class_names = config.class_names
        if seen_class_ids is None:
            seen_class_ids = config.resolved_seen_class_ids
    else:
        text_embeds = text_embeds.to(model.class_embeddings.device)
        if class_names is None:
            class_names = [str(class_id) for class_id in range(text_embeds.shape[0])]
        if len(class_names) != text_embeds.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {text_embeds.shape[0]} class embeddings.")
    class_names = list(class_names)
    num_labels = len(class_names)
    metric = SegmentationMetric(num_labels, ignore_index, seen_class_ids, class_names, device=state.device)

    prepared = _prepare_split(dataset, config.crop_size, image_mean, image_std)
    total = len(prepared) if max_samples is None else min(len(prepared), max_samples)
    with state.split_between_processes(list(range(total))) as shard:
        shard = list(shard)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(prepared, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
    need_maps = metric_backend == "evaluate" or cross_check_evaluate
    maps: list[tuple[np.ndarray, np.ndarray]] = []
    map_dtype = np.uint8 if num_labels <= 256 else np.int32

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(shard), desc=description, unit="img", disable=not (progress and state.is_local_main_process))
    position = 0
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    try:
        with autocast:
            for batch in loader:
                pixel_values, labels = _as_list(batch["pixel_values"]), _as_list(batch["labels"])
                predictions = _segment_batch(
                    model, pixel_values, [label.shape[-2:] for label in labels], text_embeds, windows_per_batch
                )
                for prediction, label in zip(predictions, labels):
                    metric.update(prediction, label)
                    if need_maps:
                        maps.append((prediction.cpu().numpy().astype(map_dtype), label.cpu().numpy()))
                    if on_prediction is not None:
                        on_prediction(shard[position], prediction.cpu(), label.cpu())
                    position += 1
                bar.update(len(predictions))
    finally:
        bar.close()
        model.train(was_training)

    ours = metric.compute()  # sums the totals over processes: every process must get here
    results = ours
    if need_maps:
        gathered = _gather_to_main(maps, state)
        outcome = None
        if state.is_main_process:
            try:
                theirs = compute_with_evaluate(
                    [prediction for prediction, _ in gathered],
                    [reference for _, reference in gathered],
                    num_labels=num_labels,
                    ignore_index=ignore_index,
                    metric_path=evaluate_metric_path,
                )
                if cross_check_evaluate:
                    try:
                        cross_check(ours, theirs, atol=atol)
                    except ValueError as error:
                        raise MetricsMismatchError(
                            f"--cross_check_evaluate: our metric and `evaluate.load({evaluate_metric_path!r})` "
                            f"disagree on {len(gathered)} scored images. {error}"
                        ) from error
                    logger.info(
                        f"Cross-check passed: `evaluate.load({evaluate_metric_path!r})` gives the same figures."
                    )
                if metric_backend == "evaluate":
                    outcome = ("ok", with_split_figures(theirs, metric.seen_class_ids, num_labels))
                else:
                    outcome = ("ok", None)
            except MetricsMismatchError as error:
                outcome = ("mismatch", str(error))
            except Exception as error:  # noqa: BLE001 - re-raised on every process below
                outcome = ("error", f"{type(error).__name__}: {error}")
        kind, payload = _broadcast_from_main(outcome, state)
        if kind == "mismatch":
            raise MetricsMismatchError(payload)
        if kind == "error":
            raise RuntimeError(f"The evaluate metric backend failed: {payload}")
        if payload is not None:
            results = payload

    output = {key: results[key] for key in METRIC_KEYS if key in results}
    output.update({key: value for key, value in results.items() if key not in output})
    output["class_names"] = class_names
    output["num_images"] = total
    output["metric_backend"] = metric_backend
    return output


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rc-eval",
        description="Evaluate a CLIP-RC model with the reference's sliding-window protocol (mIoU, seen / unseen, "
        "hIoU, pixel accuracy). Run with `accelerate launch` to score shards in several processes.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="Local folder or Hub id of a CLIP-RC model.")
    model.add_argument("--processor", default=None, help="Processor / tokenizer folder or Hub id (default: --model).")
    model.add_argument("--trust_remote_code", action="store_true", help="Allow custom code from the Hub.")

    data = parser.add_argument_group("data (one of --data_root / --dataset)")
    data.add_argument("--data_root", default=None, help="Local benchmark tree (VOCdevkit, COCO-Stuff, Context).")
    data.add_argument(
        "--dataset", default=None, help="Hub dataset id, local dataset repository or save_to_disk folder."
    )
    data.add_argument(
        "--benchmark",
        choices=sorted(BENCHMARKS),
        default=None,
        help="Benchmark the labels belong to (inferred for VOC / COCO-Stuff trees; picks Context-59 or -60).",
    )
    data.add_argument("--split", default=None, help="Split to score (default: 'val' for trees; 'validation', 'val' "
                      "or 'test' for datasets, the first that exists).")
    data.add_argument("--data_dir", default=None, help="`data_dir` of datasets.load_dataset.")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument(
        "--label_mapping",
        choices=("identity", "reduce_zero_label", "coco_stuff_164k"),
        default="identity",
        help="How a dataset's stored label values become train ids (--dataset only).",
    )
    data.add_argument("--on_invalid_label", choices=("error", "ignore"), default="error")
    data.add_argument("--max_samples", type=int, default=None, help="Score only the first N images of the split.")

    classes = parser.add_argument_group("classes")
    classes.add_argument(
        "--class_names_from",
        choices=sorted(BENCHMARKS),
        default=None,
        help="Score with another benchmark's class names (cross-dataset): encoded with the model's text tower and "
        "templates; the seen / unseen split comes from that benchmark. Default: the model's own classes.",
    )

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--batch_size", type=int, default=2, help="Images per batch (same-size images share it).")
    scoring.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per process.")
    scoring.add_argument("--windows_per_batch", type=int, default=4, help="Sliding windows per forward pass.")
    scoring.add_argument("--metric_backend", choices=("ours", "evaluate"), default="ours")
    scoring.add_argument(
        "--evaluate_metric_path",
        default="mean_iou",
        help="What `evaluate.load` gets for the evaluate backend: a Hub id or a local metric folder.",
    )
    scoring.add_argument(
        "--cross_check_evaluate",
        action="store_true",
        help="Compute both backends on the scored images and fail (non-zero exit) on any difference.",
    )
    scoring.add_argument("--atol", type=float, default=1e-6, help="Tolerance of --cross_check_evaluate.")
    scoring.add_argument("--cpu", action="store_true", help="Run on CPU even if an accelerator is available.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval_results", help="Where metrics.json (and images) are written.")
    output.add_argument("--save_overlays", type=int, default=0, metavar="N",
                        help="Save colour overlays of the first N predictions (PNG) in output_dir/overlays.")
    output.add_argument("--plot", action="store_true", help="Save a per-class IoU bar chart (needs matplotlib).")
    output.add_argument("--no_progress", action="store_true", help="No progress bar.")

    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.data_root is None) == (args.dataset is None):
        parser.error("give exactly one of --data_root (a local benchmark tree) and --dataset (a datasets source).")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data_root {args.data_root} is not a folder.")
    for name in ("batch_size", "windows_per_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be at least 1.")
    if args.save_overlays < 0:
        parser.error("--save_overlays must be >= 0.")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'clip-rc[plots]' (or matplotlib).")
    return args


def load_eval_split(args: argparse.Namespace):
    """The raw (decoded, untransformed) split to score and the number of classes its labels hold (or `None`)."""
    if args.data_root is not None:
        split = args.split or "val"
        dataset_dict = load_segmentation_dataset(
            args.data_root, benchmark=args.benchmark, splits=split, on_invalid_label=args.on_invalid_label
        )
    else:
        dataset_dict = load_segmentation_dataset(
            args.dataset,
            benchmark=args.benchmark,
            data_dir=args.data_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            label_mapping=args.label_mapping,
            on_invalid_label=args.on_invalid_label,
        )
        split = args.split or next(
            (name for name in ("validation", "val", "test") if name in dataset_dict), None
        )
        if split is None or split not in dataset_dict:
            raise ValueError(
                f"Split {split!r} is not in {args.dataset}; available splits: {list(dataset_dict)}. Pass --split."
            )
    dataset = dataset_dict[split]
    return dataset, split, getattr(installed_decoder(dataset), "num_classes", None)


def save_iou_plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Horizontal bar chart of the per-class IoU (seen classes blue, unseen orange), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["class_names"])
    ious = np.nan_to_num(np.asarray(results["per_category_iou"], dtype=np.float64), nan=0.0) * 100
    unseen = set(results["unseen_class_ids"])
    colours = ["tab:orange" if class_id in unseen else "tab:blue" for class_id in range(len(names))]
    figure, axes = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1)))
    axes.barh(range(len(names)), ious, color=colours)
    axes.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 40 else 9)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("IoU (%)")
    title = f"mIoU {100 * results['mean_iou']:.2f}" if results["mean_iou"] == results["mean_iou"] else "mIoU n/a"
    axes.set_title(title + " (blue: seen, orange: unseen)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `eval.py` / `clip-rc-eval`. Writes the results to metrics.json and returns the exit status, 0 on
    success; exits with a non-zero status when `--cross_check_evaluate` finds a difference."""
    from accelerate import Accelerator

    args = parse_args(argv)
    # Several processes started by a launcher on a machine without an accelerator (`accelerate launch --multi_gpu`
    # or torchrun; `accelerate launch --cpu` starts a single process in accelerate 1.x unless mpirun is used) run as
    # one gloo process group (accelerate's MULTI_CPU) rather than as independent single-process runs.
    accelerator = Accelerator(cpu=args.cpu or launched_without_accelerator())
    setup_logging(accelerator.is_main_process)

    model, image_processor, tokenizer = load_model_and_processor(
        args.model, args.processor, trust_remote_code=args.trust_remote_code, device=accelerator.device
    )
    dataset, split, dataset_num_classes = load_eval_split(args)

    config = model.config
    if args.class_names_from is not None:
        benchmark = get_benchmark(args.class_names_from)
        class_names, seen_class_ids = list(benchmark.class_names), list(benchmark.seen_class_ids)
        palette = [tuple(colour) for colour in benchmark.palette]
        if class_names == config.class_names:
            text_embeds = None  # the model's own classes: persisted embeddings and the reference's calibration
        else:
            text_embeds = encode_class_names(model, tokenizer, class_names, config.prompt_templates)
            logger.info(
                f"Scoring with the {len(class_names)} classes of {benchmark.name!r}, encoded with the model's "
                f"templates {list(config.prompt_templates)}."
            )
    else:
        class_names, seen_class_ids, text_embeds = config.class_names, config.resolved_seen_class_ids, None
        palette = class_palette(class_names, config.benchmark)
    if dataset_num_classes is not None and dataset_num_classes != len(class_names):
        raise SystemExit(
            f"The labels of this dataset hold {dataset_num_classes} classes but {len(class_names)} classes are "
            f"scored. Pass --class_names_from with the dataset's benchmark for cross-dataset evaluation."
        )

    # Normalisation of the image processor on the 0-255 scale (the reference's ImageNet statistics by default).
    image_mean, image_std = REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD
    if type(image_processor).__name__ == "CLIPRCImageProcessor" and image_processor.do_normalize:
        scale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
        # Rounded so that ImageNet statistics give exactly the reference's 123.675 / 58.395 ... values.
        image_mean = tuple(round(float(value) / scale, 6) for value in np.broadcast_to(image_processor.image_mean, 3))
        image_std = tuple(round(float(value) / scale, 6) for value in np.broadcast_to(image_processor.image_std, 3))

    output_dir = Path(args.output_dir)
    overlay_dir = output_dir / "overlays"

    def save_overlay(index: int, prediction: torch.Tensor, _label: torch.Tensor):
        if index >= args.save_overlays:
            return
        overlay_dir.mkdir(parents=True, exist_ok=True)
        image = dataset[index]["image"]
        overlay_label_map(image, prediction, palette, class_names).save(overlay_dir / f"{index:05d}.png")

    logger.info(
        f"Evaluating {args.model} on split {split!r} ({len(dataset)} images) in {accelerator.num_processes} "
        f"process(es), {len(class_names)} classes, metric backend {args.metric_backend!r}."
    )
    try:
        results = evaluate_model(
            model,
            dataset,
            accelerator=accelerator,
            text_embeds=text_embeds,
            class_names=class_names,
            seen_class_ids=seen_class_ids,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            max_samples=args.max_samples,
            image_mean=image_mean,
            image_std=image_std,
            windows_per_batch=args.windows_per_batch,
            metric_backend=args.metric_backend,
            evaluate_metric_path=args.evaluate_metric_path,
            cross_check_evaluate=args.cross_check_evaluate,
            atol=args.atol,
            on_prediction=save_overlay if args.save_overlays else None,
            progress=not args.no_progress,
        )
    except MetricsMismatchError as error:
        accelerator.end_training()
        raise SystemExit(f"Evaluation failed, metrics.json not written: {error}") from error

    record = json_ready(results)
    record["model"] = str(args.model)
    record["dataset"] = str(args.data_root or args.dataset)
    record["split"] = split
    record["class_names_from"] = args.class_names_from
    record["cross_checked_with_evaluate"] = bool(args.cross_check_evaluate)
    if accelerator.is_main_process:
        sys.stdout.write(format_results_table(results, class_names) + "\n")
        sys.stdout.flush()
        metrics_path = write_json_atomic(output_dir / "metrics.json", record)
        logger.info(f"Wrote {metrics_path}")
        if args.plot:
            logger.info(f"Wrote {save_iou_plot(results, output_dir / 'per_class_iou.png')}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    main()
