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

The scoring itself is [`clip_rc.evaluation.evaluate_model`], which the training script also calls.
"""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..class_sets import BENCHMARKS, ClassList, class_list, class_names_from_arguments, get_benchmark
from ..configuration_clip_rc import check_templates
from ..data import dataset_class_names, installed_decoder, load_segmentation_dataset
from ..evaluation import EvaluationClasses, evaluate_model, resolve_classes
from ..inference import load_model_and_processor
from ..metrics import format_results_table
from ..precision import DTYPE_CHOICES, accelerator_device_type, mixed_precision_of, resolve_dtype
from ..utils import json_ready, launched_without_accelerator, setup_logging, write_json_atomic
from ..visualization import class_palette, overlay_label_map, save_iou_plot


logger = logging.getLogger("clip_rc.commands.evaluate")

__all__ = ["build_parser", "main", "run"]

# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rc-eval",
        description="Evaluate a CLIP-RC model with the reference's sliding-window protocol (mIoU, seen / unseen, "
        "hIoU, pixel accuracy). Run with `accelerate launch` to score shards in several processes.",
    )
    for add_arguments in (_model_arguments, _data_arguments, _class_arguments, _scoring_and_output_arguments):
        add_arguments(parser)
    return parser


def _model_arguments(parser: argparse.ArgumentParser):
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="Local folder or Hub id of a CLIP-RC model.")
    model.add_argument("--processor", default=None, help="Processor / tokenizer folder or Hub id (default: --model).")
    model.add_argument("--trust_remote_code", action="store_true", help="Allow custom code from the Hub.")
    model.add_argument("--allow_missing_weights", action="store_true",
                       help="Score a model whose checkpoint lacks weights (they are randomly initialised).")  # fmt: skip


def _data_arguments(parser: argparse.ArgumentParser):
    data = parser.add_argument_group("data (one of --data_root / --dataset)")
    data.add_argument("--data_root", default=None, help="Local benchmark tree (VOCdevkit, COCO-Stuff, Context).")
    data.add_argument(
        "--dataset", default=None, help="Hub dataset id, local dataset repository or save_to_disk folder."
    )
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


def _class_arguments(parser: argparse.ArgumentParser):
    classes = parser.add_argument_group(
        "classes (default: the dataset's id2label.json if it has one, else the model's own classes and split)"
    )
    classes.add_argument(
        "--class_names",
        default=None,
        help="Your own classes, comma-separated, in label-id order (label k is the k-th name).",
    )
    classes.add_argument(
        "--class_names_file",
        default=None,
        help="A UTF-8 text file with one class name a line (line k + 1 names label k).",
    )
    classes.add_argument(
        "--class_names_from",
        choices=sorted(BENCHMARKS),
        default=None,
        help="Score with another benchmark's class names (cross-dataset): encoded with the model's text tower and "
        "templates; the seen / unseen split comes from that benchmark.",
    )
    classes.add_argument(
        "--unseen_classes",
        default=None,
        help="The zero-shot split of the scored classes: unseen classes by name or id, comma-separated (default: "
        "the model's split for its own classes, the benchmark's for a benchmark's classes, none otherwise).",
    )
    classes.add_argument(
        "--templates", nargs="+", default=None,
        help="Prompt templates with one '{}' to encode the classes with (default: the model's); given, the classes "
        "are encoded at run time, without the calibration of the model's own.",
    )  # fmt: skip


def _scoring_and_output_arguments(parser: argparse.ArgumentParser):
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
    scoring.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="fp32",
        help="fp32 (the reference's scores), bf16 / fp16 autocast, or auto: bf16 where the processor multiplies bf16 "
        "fast, fp32 elsewhere.",
    )  # fmt: skip

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval_results", help="Where metrics.json (and images) are written.")
    output.add_argument("--save_overlays", type=int, default=0, metavar="N",
                        help="Save colour overlays of the first N predictions (PNG) in output_dir/overlays.")  # fmt: skip
    output.add_argument("--plot", action="store_true", help="Save a per-class IoU bar chart (needs matplotlib).")
    output.add_argument("--no_progress", action="store_true", help="No progress bar.")


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
    cpu = args.cpu or launched_without_accelerator()
    dtype = resolve_dtype(args.dtype, accelerator_device_type(cpu))
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision_of(dtype))
    setup_logging(accelerator.is_main_process)
    model, image_processor, tokenizer = load_model_and_processor(
        args.model,
        args.processor,
        trust_remote_code=args.trust_remote_code,
        device=accelerator.device,
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
