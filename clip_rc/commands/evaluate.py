"""Zero-shot semantic segmentation evaluation of CLIP-RC models (`eval.py`, `clip-rc-eval`).

The reference test protocol (SPEC §5, §7) through the one inference path: the image processor resizes every image so
that its short side is the model's crop size and cuts the sliding windows, the model maps windows to logits, and the
image processor's `post_process_semantic_segmentation` averages the calibrated scores, resizes them to the label's
size and takes the arg-max. Per-class pixel totals are summed over the whole split while scoring
([`SegmentationMetric`]), so IoU is intersection / union over the set, as `evaluate`'s `mean_iou` computes it; mIoU
over the seen and the unseen classes and their harmonic mean (hIoU) are added.

Several processes (`accelerate launch --num_processes N eval.py ...`) each score a contiguous shard of the split
(`PartialState.split_between_processes`, no padding, so no image counts twice) and the totals are summed across
processes before the figures are computed.

```bash
python eval.py --model runs/voc-inductive --data_root data/VOCdevkit --output_dir runs/voc-inductive/eval
accelerate launch --num_processes 2 eval.py --model runs/coco-inductive --data_root data/VOCdevkit \
    --class_names_from voc --output_dir runs/coco-on-voc
```

The classes come from, in this order: `--class_names` / `--class_names_file`, `--class_names_from` (a benchmark), the
`id2label.json` of the dataset repository, and the model's saved config (its classes, zero-shot split and
templates). Classes other than the model's own are encoded at run time by its text tower; `--unseen_classes` sets
the split the seen / unseen / harmonic figures use.

[`evaluate_model`] is the same scoring as a function, for periodic evaluation during training.
"""

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from ..class_sets import BENCHMARKS, ClassList, check_templates, class_list, class_names_from_arguments, get_benchmark
from ..data import dataset_class_names, installed_decoder, load_segmentation_dataset
from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..inference import encode_class_names, load_model_and_processor
from ..metrics import SegmentationMetric, compute_with_evaluate, cross_check, format_results_table, harmonic_mean, nanmean
from ..utils import json_ready, launched_without_accelerator, setup_logging, write_json_atomic
from ..visualization import class_palette, overlay_label_map, save_iou_plot


logger = logging.getLogger("clip_rc.commands.evaluate")

__all__ = ["METRIC_KEYS", "MetricsMismatchError", "evaluate_model", "main", "with_split_figures"]

# The keys of `evaluate`'s `mean_iou` plus the zero-shot split figures, in the order of the metrics file.
MEAN_IOU_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
METRIC_KEYS = MEAN_IOU_KEYS + ("mean_iou_seen", "mean_iou_unseen", "harmonic_iou", "seen_class_ids", "unseen_class_ids")


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
    metric = SegmentationMetric(len(classes.names), ignore_index, classes.seen_class_ids, classes.names, device=state.device)
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if total == 0:
        raise ValueError("The evaluation split is empty.")
    with state.split_between_processes(list(range(total))) as shard:
        split = ProcessedSplit(dataset, image_processor, shard)
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_windows)
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
        theirs = _evaluate_backend_results(maps, state, classes, ignore_index, evaluate_metric_path, cross_check_with, atol)
        results = theirs if metric_backend == "evaluate" else results
    return {**results, "class_names": classes.names, "num_images": total, "metric_backend": metric_backend}


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
    model.add_argument("--allow_missing_weights", action="store_true",
                       help="Score a model whose checkpoint lacks weights (they are randomly initialised).")  # fmt: skip

    data = parser.add_argument_group("data (one of --data_root / --dataset)")
    data.add_argument("--data_root", default=None, help="Local benchmark tree (VOCdevkit, COCO-Stuff, Context).")
    data.add_argument("--dataset", default=None, help="Hub dataset id, local dataset repository or save_to_disk folder.")
    data.add_argument(
        "--benchmark", choices=sorted(BENCHMARKS), default=None,
        help="Benchmark the labels belong to (inferred for VOC / COCO-Stuff trees; picks Context-59 or -60).",
    )  # fmt: skip
    data.add_argument("--split", default=None, help="Split to score (default: 'val' for trees; 'validation', 'val' "
                      "or 'test' for datasets, the first that exists).")  # fmt: skip
    data.add_argument("--data_dir", default=None, help="`data_dir` of datasets.load_dataset.")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument(
        "--label_mapping", choices=("identity", "reduce_zero_label", "coco_stuff_164k"), default=None,
        help="How a dataset's stored label values become train ids (--dataset only; default: reduce_zero_label for "
        "--benchmark ade20k-150, identity otherwise).",
    )  # fmt: skip
    data.add_argument("--on_invalid_label", choices=("error", "ignore"), default="error")
    data.add_argument("--max_samples", type=int, default=None, help="Score only the first N images of the split.")

    classes = parser.add_argument_group(
        "classes (default: the dataset's id2label.json if it has one, else the model's own classes and split)"
    )
    classes.add_argument("--class_names", default=None,
                         help="Your own classes, comma-separated, in label-id order (label k is the k-th name).")
    classes.add_argument("--class_names_file", default=None,
                         help="A UTF-8 text file with one class name a line (line k + 1 names label k).")
    classes.add_argument(
        "--class_names_from", choices=sorted(BENCHMARKS), default=None,
        help="Score with another benchmark's class names (cross-dataset): encoded with the model's text tower and "
        "templates; the seen / unseen split comes from that benchmark.",
    )
    classes.add_argument(
        "--unseen_classes", default=None,
        help="The zero-shot split of the scored classes: unseen classes by name or id, comma-separated (default: "
        "the model's split for its own classes, the benchmark's for a benchmark's classes, none otherwise).",
    )
    classes.add_argument(
        "--templates", nargs="+", default=None,
        help="Prompt templates with one '{}' to encode the classes with (default: the model's); given, the classes "
        "are encoded at run time, without the calibration of the model's own.",
    )  # fmt: skip

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--batch_size", type=int, default=2, help="Images per forward pass (all their windows).")
    scoring.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per process.")
    scoring.add_argument("--metric_backend", choices=("ours", "evaluate"), default="ours")
    scoring.add_argument(
        "--evaluate_metric_path", default="mean_iou",
        help="What `evaluate.load` gets for the evaluate backend: a Hub id or a local metric folder.",
    )  # fmt: skip
    scoring.add_argument(
        "--cross_check_evaluate", action="store_true",
        help="Compute both backends on the scored images and fail (non-zero exit) on any difference.",
    )  # fmt: skip
    scoring.add_argument("--atol", type=float, default=1e-6, help="Tolerance of --cross_check_evaluate.")
    scoring.add_argument("--cpu", action="store_true", help="Run on CPU even if an accelerator is available.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval_results", help="Where metrics.json (and images) are written.")
    output.add_argument("--save_overlays", type=int, default=0, metavar="N",
                        help="Save colour overlays of the first N predictions (PNG) in output_dir/overlays.")  # fmt: skip
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
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1.")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be at least 1.")
    if args.save_overlays < 0:
        parser.error("--save_overlays must be >= 0.")
    if args.class_names_from is not None and (args.class_names is not None or args.class_names_file is not None):
        parser.error("give the classes with one of --class_names, --class_names_file and --class_names_from.")
    if args.templates is not None:
        try:
            args.templates = list(check_templates(args.templates, field="--templates"))
        except ValueError as error:
            parser.error(str(error))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'clip-rc[plots]' (or matplotlib).")
    return args


def load_eval_split(args: argparse.Namespace, num_classes: int | None = None):
    """The raw (decoded) split to score, its name, and the number of classes its labels hold (or `None`). The label
    ids of a `--dataset` without `--benchmark` are checked against `num_classes` (the scored classes)."""
    if args.data_root is not None:
        split = args.split or "val"
        dataset_dict = load_segmentation_dataset(
            args.data_root, benchmark=args.benchmark, splits=split, on_invalid_label=args.on_invalid_label
        )
    else:
        dataset_dict = load_segmentation_dataset(
            args.dataset, benchmark=args.benchmark, data_dir=args.data_dir, image_column=args.image_column,
            label_column=args.label_column, label_mapping=args.label_mapping, on_invalid_label=args.on_invalid_label,
            num_classes=num_classes if args.benchmark is None else None,
        )  # fmt: skip
        split = args.split or next((name for name in ("validation", "val", "test") if name in dataset_dict), None)
        if split is None or split not in dataset_dict:
            raise ValueError(
                f"Split {split!r} is not in {args.dataset}; available splits: {list(dataset_dict)}. Pass --split."
            )
    dataset = dataset_dict[split]
    return dataset, split, getattr(installed_decoder(dataset), "num_classes", None)


def requested_class_list(args, config) -> ClassList:
    """The class list to score with and its split: `--class_names` / `--class_names_file`, `--class_names_from`, the
    dataset's `id2label.json`, or the model's own (see the module docstring)."""
    requested = class_names_from_arguments(args.class_names, args.class_names_file)
    if requested is None and args.class_names_from is not None:
        requested = get_benchmark(args.class_names_from).class_names, f"--class_names_from {args.class_names_from}"
    requested = requested or dataset_class_names(args.data_root or args.dataset)
    names, source = requested or (config.class_names, "the model's config")
    # The model's own classes keep its split; a benchmark's classes get the benchmark's (see `class_list`).
    default_unseen = config.unseen_class_ids if list(names) == config.class_names else None
    return class_list(names, source, args.unseen_classes, default_unseen)


def classes_from_args(args, model, image_processor, tokenizer) -> tuple[EvaluationClasses, list, str]:
    """The classes to score with, their palette and where they come from."""
    requested = requested_class_list(args, model.config)
    classes = resolve_classes(
        model, image_processor, tokenizer, list(requested.names), list(requested.seen_class_ids), args.templates
    )
    if classes.text_embeds is not None:
        templates = args.templates or list(model.config.prompt_templates)
        logger.info(f"Scoring with the {len(classes.names)} classes of {requested.source}, encoded with the "
                    f"templates {templates}.")  # fmt: skip
    return classes, class_palette(classes.names, requested.benchmark or model.config.benchmark), requested.source


def _overlay_saver(args, dataset, classes: EvaluationClasses, palette) -> Callable | None:
    if not args.save_overlays:
        return None
    overlay_dir = Path(args.output_dir) / "overlays"

    def save_overlay(index: int, prediction: torch.Tensor, _label: torch.Tensor):
        if index < args.save_overlays:
            overlay_dir.mkdir(parents=True, exist_ok=True)
            overlay = overlay_label_map(dataset[index]["image"], prediction, palette, classes.names)
            overlay.save(overlay_dir / f"{index:05d}.png")

    return save_overlay


def _write_results(args, accelerator, results, split) -> dict[str, Any]:
    """The metrics record: printed as a table and written to `output_dir/metrics.json` (and the plot) on the main
    process."""
    record = json_ready(results)
    record.update(
        model=str(args.model), dataset=str(args.data_root or args.dataset), split=split,
        class_names_from=args.class_names_from, cross_checked_with_evaluate=bool(args.cross_check_evaluate),
    )  # fmt: skip
    if accelerator.is_main_process:
        sys.stdout.write(format_results_table(results, results["class_names"]) + "\n")
        sys.stdout.flush()
        logger.info(f"Wrote {write_json_atomic(Path(args.output_dir) / 'metrics.json', record)}")
        if args.plot:
            logger.info(f"Wrote {save_iou_plot(results, Path(args.output_dir) / 'per_class_iou.png')}")
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as `args` says; returns the metrics record (as written to metrics.json) on every process."""
    # Several processes started by a launcher on a machine without an accelerator run as one gloo group.
    accelerator = Accelerator(cpu=args.cpu or launched_without_accelerator())
    setup_logging(accelerator.is_main_process)
    model, image_processor, tokenizer = load_model_and_processor(
        args.model, args.processor, trust_remote_code=args.trust_remote_code, device=accelerator.device,
        allow_missing_weights=args.allow_missing_weights,
    )
    classes, palette, class_source = classes_from_args(args, model, image_processor, tokenizer)
    dataset, split, dataset_num_classes = load_eval_split(args, len(classes.names))
    if dataset_num_classes is not None and dataset_num_classes != len(classes.names):
        raise ValueError(
            f"The labels of this dataset hold {dataset_num_classes} classes but {len(classes.names)} classes are "
            "scored. Pass --class_names_from with the dataset's benchmark for cross-dataset evaluation (or "
            "--class_names / --class_names_file with its classes)."
        )
    logger.info(f"Evaluating {args.model} on split {split!r} ({len(dataset)} images) in {accelerator.num_processes} "
                f"process(es), {len(classes.names)} classes, metric backend {args.metric_backend!r}.")  # fmt: skip
    try:
        results = evaluate_model(
            model, dataset, image_processor=image_processor, accelerator=accelerator, classes=classes,
            batch_size=args.batch_size, num_workers=args.num_workers, max_samples=args.max_samples,
            metric_backend=args.metric_backend, evaluate_metric_path=args.evaluate_metric_path,
            cross_check_evaluate=args.cross_check_evaluate, atol=args.atol,
            on_prediction=_overlay_saver(args, dataset, classes, palette), progress=not args.no_progress,
        )  # fmt: skip
        return _write_results(args, accelerator, {**results, "class_names_source": class_source}, split)
    finally:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `eval.py` / `clip-rc-eval`: 0 on success; 1 (metrics.json not written) when the evaluation
    fails, e.g. `--cross_check_evaluate` finds a difference."""
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, RuntimeError) as error:
        logging.getLogger("clip_rc.commands.evaluate").error(f"Evaluation failed, metrics.json not written: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
