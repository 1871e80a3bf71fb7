"""Training of CLIP-RC with Accelerate: the reference's six recipes (SPEC §6) as an iteration-based loop.

Run `python train_accelerate.py --help` (or `accelerate launch train_accelerate.py ...`, or the console entry
`clip-rc-train`). Arguments can also come from one JSON / YAML file given as the single argument.

What the loop reproduces from the reference (mmsegmentation 0.24 / mmcv 1.4 `IterBasedRunner`):

- Optimiser: AdamW, base lr 2e-5 with mmcv's `paramwise_cfg` (custom keys `backbone` lr x10, `head` lr x10,
  `text_encoder` lr x0, `norm` / `ln` decay x0; the first key found in a parameter name wins, longest key first). The
  keys are matched against each parameter's reference name (`backbone.*`, `text_encoder.*`, `decode_head.*`), so in
  effect every trainable parameter (prompts, prompt projection, prompt norm, the whole decode head) runs at
  lr 2e-4 with weight decay 0.01: the norms inside the backbone and the head match `backbone` / `head` before they
  could match `norm` / `ln`. [`reference_parameter_groups`] builds these effective groups (one per module family,
  `backbone` and `head`) and records the multipliers it applied.
- Schedule: mmcv's `PolyLrUpdaterHook` with linear warm-up, by iteration:
  `regular = (lr0 - min_lr) * (1 - it / T) ** power + min_lr`, and for `it < warmup`
  `lr = regular * (1 - (1 - it / warmup) * (1 - warmup_ratio))`, where `it` counts the optimiser updates done so far
  (0 for the first update), `T` = the schedule's total iterations (the recipe's iterations unless told otherwise),
  power 0.9, min_lr 1e-6, warm-up 1500 iterations from ratio 1e-6. See [`reference_learning_rate`].
- Iterations, batch: VOC 40k (inductive, fully) / 20k (transductive, from the inductive iteration-20000 weights),
  16 images per iteration (8 per GPU x 2); COCO-Stuff 80k / 40k, 4 per iteration (2 x 2).
- Data: an infinite stream of per-epoch permutations (epoch `e` shuffled with `seed + e`), cut into global
  batches that are split between processes; each sample's augmentation draws from its own generator seeded with
  `(seed, epoch, position in epoch)`, so the stream does not depend on the number of data workers and a resumed run
  continues exactly where the checkpoint stopped.
- Class embeddings are computed once (by `from_clip` with the CLIP tokenizer, or loaded with a CLIP-RC checkpoint)
  and persisted in the model; the loop never encodes text.

Classes ([`training_class_list`]): `--class_names` / `--class_names_file`, else the dataset repository's
`id2label.json` (as transformers' semantic-segmentation example reads it), else `--benchmark`, else the loaded
model's classes or the benchmark of `--preset`; `--unseen_classes` (names or ids) sets the zero-shot split and
`--templates` the prompt templates. From CLIP the class embeddings are encoded for that list; a loaded model given
other classes (or templates) has them re-encoded by its text tower. The config saved with the model holds
`id2label`, `seen_class_ids`, `prompt_templates` and `benchmark` (a benchmark's name, or `"custom"`), and the data
loaders check every label id against the number of classes.

Checkpoints (`output_dir/checkpoint-N`) are written atomically (to `output_dir/.tmp-checkpoint-N`, then renamed);
each holds the Accelerate state (model, optimiser, scheduler, RNG of every process), `training_state.json` (step,
data position, recipe, log history) and the model's `config.json` + processor, so a checkpoint folder also loads with
`from_pretrained` (e.g. to start the transductive stage from `checkpoint-20000`). `--resume_from_checkpoint latest`
takes the newest complete checkpoint (temporary and incomplete folders are ignored) and starts afresh when there is
none; resuming is exact or refused: a changed recipe (seed, batch size, data, learning rate, ...) is named, and a
missing or unreadable random-number state is an error, unless `--allow_inexact_resume`. The final model is written
beside the checkpoints with `save_pretrained`, its `config.json` moved in last, so `from_pretrained(output_dir)` never
sees a half-written model.

Nothing is lost: as with `transformers.Trainer`, a non-empty `output_dir` is refused unless resuming from one of its
checkpoints or `--overwrite_output_dir`; every folder this module writes holds a marker file, and at start it removes
only the `.tmp-*` folders holding it (the leftovers of an interrupted run), never a user's; a README.md it did not
write is never replaced by the model card. Training stops at the first non-finite loss ([`TrainingDivergedError`],
before the backward pass, on every process), and weights holding NaN or infinity are never saved, as a checkpoint or
as the final model.

Processes: `python train_accelerate.py ...` runs one process; `accelerate launch --multi_gpu --num_processes N
train_accelerate.py ...` runs N with DDP (without `find_unused_parameters`: every trainable parameter gets a gradient
in every setting). On a machine without GPU, accelerate 1.x's `--cpu --num_processes N` starts a single process
unless `mpirun` is used; `--multi_gpu` starts N processes, which this script then runs as one gloo process group
(Accelerate's MULTI_CPU). All processes use the same seed (as mmseg and the HF Trainer), each its own data shard.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import HfApi
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser
from transformers.dynamic_module_utils import custom_object_save

from .. import PRESETS, CLIPRCConfig, CLIPRCForSemanticSegmentation
from ..class_sets import BENCHMARKS, ClassList, class_list, class_names_from_arguments, get_benchmark
from ..configuration_clip_rc import check_templates
from ..data import (
    AugmentedTrainSamples,
    SegmentationTrainTransform,
    collate_fn,
    dataset_class_names,
    load_segmentation_dataset,
)
from ..evaluation import evaluate_model
from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..inference import encode_class_names
from ..metrics import format_results_table
from ..model_card import MODEL_CARD_MARKER, build_model_card
from ..precision import DTYPE_CHOICES, accelerator_device_type, mixed_precision_of, resolve_dtype
from ..presets import (
    BASE_LEARNING_RATE,
    LEARNING_RATE_MULTIPLIER,
    RECIPES,
    WARMUP_ITERATIONS,
    WEIGHT_DECAY,
    train_scale,
    window_stride,
)
from ..processing_clip_rc import CLIPRCProcessor
from ..utils import (
    check_model_folder,
    json_ready,
    launched_without_accelerator,
    non_finite_tensors,
    setup_logging,
    write_json_atomic,
)


logger = get_logger("clip_rc.commands.train")  # also when run as __main__ (python -m clip_rc.commands.train)

__all__ = [
    "DataArguments",
    "ModelArguments",
    "PolyWarmupLR",
    "TrainingArguments",
    "TrainingDivergedError",
    "find_latest_checkpoint",
    "list_checkpoints",
    "main",
    "parse_args",
    "reference_learning_rate",
    "reference_parameter_groups",
    "train",
    "training_class_list",
]

# mmcv `paramwise_cfg.custom_keys` of every reference config: key -> (lr_mult, decay_mult).
REFERENCE_CUSTOM_KEYS: dict[str, tuple[float, float]] = {
    "backbone": (10.0, 1.0),
    "text_encoder": (0.0, 1.0),
    "norm": (1.0, 0.0),
    "ln": (1.0, 0.0),
    "head": (10.0, 1.0),
}
# Our module prefixes -> the reference's.
_REFERENCE_PREFIXES = (
    ("clip_rc.vision_model.", "backbone."),
    ("clip_rc.visual_projection.", "backbone.proj."),
    ("clip_rc.text_model.", "text_encoder."),
    ("clip_rc.text_projection.", "text_encoder.text_projection."),
    ("decode_head.", "decode_head."),
)

TRAINING_STATE_NAME = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Every folder this module writes (temporary folders, checkpoints) holds this file: at a new start only `.tmp-*`
# folders holding it are removed, never a user's.
OWNER_MARKER = ".written-by-clip-rc-training"
# Names of the temporary folders this module uses; a user's entry of such a name is never deleted, but refused.
_TEMPORARY_PATTERN = re.compile(r"^\.tmp-(checkpoint-\d+|deleting-checkpoint-\d+|final)$")


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Where the model comes from and which recipe it follows."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Reference recipe: sets the setting, class list and zero-shot split, prompt templates and tokens, "
            "loss weights, iterations and batch size (SPEC §6). Required with --clip_model_name_or_path; with "
            "--model_name_or_path its setting and loss weights are applied to the loaded model.",
            "choices": list(PRESETS),
        },
    )
    clip_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from CLIP (Hub id or local folder in the Hub's CLIPModel format, e.g. "
            "openai/clip-vit-base-patch16), as the reference starts from OpenAI's ViT-B/16 (`from_clip`)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from CLIP-RC weights: a saved model or a checkpoint-N folder of a previous run (e.g. the "
            "transductive stage from the inductive run's checkpoint-20000)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "CLIP tokenizer saved with the processor; defaults to the one beside the model / CLIP."},
    )
    crop_size: int | None = field(
        default=None,
        metadata={
            "help": "Training crop / sliding-window size (default: the config's, 512). Must be a multiple of "
            "patch_size x region_grid_size."
        },
    )
    sliding_window_stride: int | None = field(
        default=None,
        metadata={"help": "Stride of the evaluation windows (default: 426 at crop 512, scaled with --crop_size)."},
    )
    templates: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompt templates with one '{}' for the class name (default: the preset's, or the loaded model's); "
            "the class embeddings average over them. Saved in the config (prompt_templates)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value overrides of CLIPRCConfig fields (values parsed as JSON when possible),"
            " e.g. 'decoder_hidden_size=64,prompt_dropout=0.0'. With --model_name_or_path only fields that do not "
            "change the architecture may be set. Classes, split and templates have their own arguments."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})


@dataclass
class DataArguments:
    """Which data and how it is augmented."""

    dataset: str = field(
        metadata={
            "help": "A local VOC 2012 / COCO-Stuff 164k / PASCAL Context tree, a dataset saved with save_to_disk, a "
            "local dataset repository or a Hub dataset (see clip_rc.data.load_segmentation_dataset)."
        }
    )
    benchmark: str | None = field(
        default=None,
        metadata={
            "help": "Benchmark of the labels (voc, coco-stuff, ade20k-150, ...); defaults to the model "
            "config's. Its classes are the class list unless --class_names(_file) or the dataset's "
            "id2label.json give one."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "Your own classes, comma-separated, in label-id order (label k is the k-th name). First "
            "in precedence: then --class_names_file, the dataset repository's id2label.json, --benchmark, and "
            "the preset's benchmark (from CLIP) or the loaded model's classes."
        },
    )
    class_names_file: str | None = field(
        default=None,
        metadata={
            "help": "A UTF-8 text file with one class name a line (line k + 1 names label k); instead of "
            "--class_names."
        },
    )
    unseen_classes: str | None = field(
        default=None,
        metadata={
            "help": "The zero-shot split: unseen classes by name or id, comma-separated (inductive training "
            "ignores their pixels and leaves them out of the head; transductive training pseudo-labels them). "
            "Default: the benchmark's split when the classes are a benchmark's (or the loaded model's), none "
            "otherwise."
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "`data_dir` of datasets.load_dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets dataset."})
    label_column: str = field(default="label", metadata={"help": "Label-map column of a datasets dataset."})
    label_mapping: str | None = field(
        default=None,
        metadata={
            "help": "How stored label values become train ids for datasets datasets (local trees set their own); "
            "default: reduce_zero_label for ade20k-150, identity otherwise.",
            "choices": ["identity", "reduce_zero_label", "coco_stuff_164k"],
        },
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Evaluation split; default: 'val' or 'validation' if present. 'none' disables evaluation."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N samples only."})
    train_scale: list[int] | None = field(
        default=None,
        metadata={
            "help": "mmseg img_scale (long short) of the random rescale; default (2048, 512) scaled by "
            "crop_size / 512."
        },
    )
    photometric_distortion: bool = field(default=True, metadata={"help": "Apply PhotoMetricDistortion."})
    eval_shortest_edge: int | None = field(
        default=None, metadata={"help": "Short side of evaluation images (default: crop_size, as the reference)."}
    )


@dataclass
class TrainingArguments:
    """Optimisation, schedule, checkpointing and logging."""

    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final model are written."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that is not empty: checkpoints of an earlier run there are "
            "deleted and the final save replaces files of the names it writes, except a README.md that "
            "clip_rc.commands.train did not write (kept). Without it a non-empty output_dir is refused unless "
            "resuming from one of its checkpoints."
        },
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Training iterations (optimiser updates); default: the recipe's."}
    )
    total_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per iteration over all processes and accumulation steps; default: the recipe's "
            "(VOC 16, COCO-Stuff 4). Ignored when --per_device_train_batch_size is given."
        },
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per process and forward pass; default: total_train_batch_size / (processes x "
            "gradient_accumulation_steps)."
        },
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forward passes per optimiser update."})
    learning_rate: float = field(
        default=BASE_LEARNING_RATE, metadata={"help": "Base learning rate (the reference's lr)."}
    )
    lr_multiplier: float = field(
        default=LEARNING_RATE_MULTIPLIER,
        metadata={"help": "Multiplier of the backbone and head custom keys (reference: 10)."},
    )
    weight_decay: float = field(default=WEIGHT_DECAY, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip the gradient norm (the reference does not clip)."}
    )
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warm-up iterations (default 1500)."})
    warmup_lr_ratio: float = field(default=1e-6, metadata={"help": "Warm-up starts at this fraction of the lr."})
    lr_power: float = field(default=0.9, metadata={"help": "Power of the poly decay."})
    min_learning_rate: float = field(default=1e-6, metadata={"help": "Final lr of the poly decay."})
    lr_decay_steps: int | None = field(
        default=None,
        metadata={
            "help": "Iterations T of the poly decay; default: the recipe's iterations (so a shorter "
            "--max_steps stops the reference schedule early), or --max_steps without a recipe."
        },
    )
    scale_lr_schedule: bool = field(
        default=False,
        metadata={
            "help": "Fit the schedule to --max_steps: decay over max_steps and warm-up scaled by max_steps / "
            "the recipe's iterations (explicit --warmup_steps / --lr_decay_steps still win)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and augmentation."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Accelerate mixed precision; default: the launcher's configuration.",
            "choices": ["no", "fp16", "bf16", "fp8"],
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Precision of the training step: fp32, bf16 / fp16 autocast, or auto (bf16 where the processor "
            "multiplies bf16 fast, fp32 elsewhere). Default: --mixed_precision.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    logging_steps: int = field(default=50, metadata={"help": "Log the training losses every N iterations."})
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate every N iterations (0: only at the end); default: the recipe's iterations / 10 "
            "(mmseg's schedule_20k/40k/80k intervals 2000/4000/8000)."
        },
    )
    final_evaluation: bool = field(default=True, metadata={"help": "Evaluate the final model."})
    checkpointing_steps: int | None = field(
        default=None,
        metadata={"help": "Save a checkpoint every N iterations (0: never); default: the recipe's iterations / 10."},
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint-N folder, or 'latest' for the newest complete one in output_dir (a fresh "
            "start when there is none)."
        },
    )
    allow_inexact_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume even though the run cannot continue exactly: a random-number state file of the "
            "checkpoint is missing or unreadable, or the recipe differs from the checkpoint's (seed, batch "
            "size, data, ...; the optimiser and schedule state still come from the checkpoint). Without it "
            "either is an error naming the file or the changed arguments."
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Trackers: none, tensorboard or all (every installed tracker).",
            "choices": ["none", "tensorboard", "all"],
        },
    )
    tracker_project_name: str = field(default="clip-rc", metadata={"help": "Run name of the trackers."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the activations of the image tower's and the decoder's layers in the backward "
            "pass instead of keeping them: less memory, about one more forward pass of time, same results."
        },
    )
    ddp_find_unused_parameters: bool = field(
        default=False,
        metadata={
            "help": "DDP find_unused_parameters. Not needed: every trainable parameter gets a gradient in "
            "every setting (the reference needs it for unused self-attention weights we do not have)."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final output_dir to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository (default: output_dir's name)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (or `argv`); a single `.json` / `.yaml` / `.yml` argument is read as an argument file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


# ---------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------------------------


def reference_parameter_name(name: str) -> str:
    """The reference's name of one of our parameters (`clip_rc.vision_model.x` -> `backbone.x`, ...)."""
    for ours, theirs in _REFERENCE_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def reference_multipliers(name: str, lr_multiplier: float = LEARNING_RATE_MULTIPLIER) -> tuple[float, float]:
    """mmcv `DefaultOptimizerConstructor` (custom keys): (lr_mult, decay_mult) of a parameter from its reference
    name; keys sorted alphabetically then longest first, the first key contained in the name wins."""
    custom_keys = dict(REFERENCE_CUSTOM_KEYS)
    custom_keys["backbone"] = (lr_multiplier, 1.0)
    custom_keys["head"] = (lr_multiplier, 1.0)
    reference_name = reference_parameter_name(name)
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in reference_name:
            return custom_keys[key]
    return 1.0, 1.0


def reference_parameter_groups(
    model: torch.nn.Module,
    learning_rate: float = BASE_LEARNING_RATE,
    weight_decay: float = WEIGHT_DECAY,
    lr_multiplier: float = LEARNING_RATE_MULTIPLIER,
) -> list[dict[str, Any]]:
    """
    AdamW parameter groups of the trainable parameters with the reference's per-name multipliers (SPEC §6).

    Parameters are grouped by module family (`backbone`: everything trainable in the image tower; `head`: the decode
    head; `other`) and multipliers; with the reference's keys this gives two groups, both at
    `learning_rate * 10` with decay `weight_decay` (norms included, see the module docstring).

    Returns:
        `list[dict]`: groups with `params`, `lr`, `weight_decay`, `name`, `lr_mult`, `decay_mult`, `param_names`.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr_mult, decay_mult = reference_multipliers(name, lr_multiplier)
        family = reference_parameter_name(name).split(".", 1)[0]
        family = {"backbone": "backbone", "decode_head": "head"}.get(family, "other")
        key = (family, lr_mult, decay_mult)
        if key not in groups:
            suffix = "" if (lr_mult, decay_mult) == (lr_multiplier, 1.0) else f"_lr{lr_mult:g}_decay{decay_mult:g}"
            groups[key] = {
                "name": family + suffix,
                "params": [],
                "param_names": [],
                "lr": learning_rate * lr_mult,
                "weight_decay": weight_decay * decay_mult,
                "lr_mult": lr_mult,
                "decay_mult": decay_mult,
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def reference_learning_rate(
    iteration: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = WARMUP_ITERATIONS,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
    min_lr: float = 1e-6,
) -> float:
    """
    mmcv `PolyLrUpdaterHook(power, min_lr, by_epoch=False, warmup='linear')` at `iteration` (updates done so far).

    Past `total_steps` the poly factor is held at 0 (lr = min_lr) instead of mmcv's complex power.
    """
    progress = min(iteration / total_steps, 1.0) if total_steps > 0 else 1.0
    regular = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if warmup_steps > 0 and iteration < warmup_steps:
        k = (1.0 - iteration / warmup_steps) * (1.0 - warmup_ratio)
        return regular * (1.0 - k)
    return regular


class PolyWarmupLR(LRScheduler):
    """
    The reference's learning-rate schedule ([`reference_learning_rate`] on every group's initial lr) as a PyTorch
    scheduler: after `n` calls of `step()` the groups hold the lr of iteration `n`. Step it once per optimiser update.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = WARMUP_ITERATIONS,
        warmup_ratio: float = 1e-6,
        power: float = 0.9,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
        if warmup_steps < 0 or not 0 < warmup_ratio <= 1:
            raise ValueError(f"Need warmup_steps >= 0 and 0 < warmup_ratio <= 1, got {warmup_steps}, {warmup_ratio}.")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.power = power
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            reference_learning_rate(
                self.last_epoch,
                base_lr,
                self.total_steps,
                self.warmup_steps,
                self.warmup_ratio,
                self.power,
                self.min_lr,
            )
            for base_lr in self.base_lrs
        ]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


class InfiniteShardedBatchSampler(torch.utils.data.Sampler):
    """
    Batches of an endless stream of shuffled epochs, split between processes.

    The stream concatenates permutations of the dataset, epoch `e` drawn with `torch.randperm` seeded `seed + e`. It is
    cut into global batches of `batch_size * num_processes` consecutive samples (a batch may straddle two epochs);
    process `r` takes samples `[r * batch_size, (r + 1) * batch_size)` of each. Every item is the key
    `(dataset index, epoch, position in epoch)`. `start_sample` skips that many samples of the stream (resume).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        start_sample: int = 0,
    ):
        if num_samples < 1:
            raise ValueError("The training split is empty.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_sample = start_sample

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self):
        epoch, position = divmod(self.start_sample, self.num_samples)
        order = self.permutation(epoch)
        first = self.process_index * self.batch_size
        last = first + self.batch_size
        while True:
            batch = []
            for slot in range(self.batch_size * self.num_processes):
                if position == self.num_samples:
                    epoch, position = epoch + 1, 0
                    order = self.permutation(epoch)
                if first <= slot < last:
                    batch.append((order[position], epoch, position))
                position += 1
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _warn(message: str):
    """A warning through Accelerate's logger (main process only) when its state exists, plain logging otherwise."""
    from accelerate.state import is_initialized

    if is_initialized():
        logger.warning(message)
    else:
        logging.getLogger(__name__).warning(message)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` folders holding `training_state.json`) of `output_dir`, oldest first.
    Temporary (`.tmp-checkpoint-N`) and incomplete folders are left out."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir():
            if (entry / TRAINING_STATE_NAME).is_file():
                found.append((int(match.group(1)), entry))
            else:
                _warn(f"Ignoring incomplete checkpoint folder {entry} (no {TRAINING_STATE_NAME}).")
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `output_dir`, or `None`."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / TRAINING_STATE_NAME).is_file()


def _written_here(path: Path) -> bool:
    """Whether `path` is a folder this module wrote (it holds the owner marker)."""
    return path.is_dir() and not path.is_symlink() and (path / OWNER_MARKER).is_file()


def _mark(folder: Path):
    (folder / OWNER_MARKER).write_text(
        "Written by clip_rc.commands.train; a `.tmp-*` folder holding this file is removed at the next start.\n",
        encoding="utf-8",
    )


def _clear(path: Path):
    """Make room at `path`: remove the folder this module wrote there, refuse to touch anything else."""
    if path.exists() or path.is_symlink():
        if not _written_here(path):
            raise FileExistsError(f"{path} exists and was not written by clip_rc.commands.train; move it away.")
        shutil.rmtree(path)


def _fresh_temporary_folder(path: Path) -> Path:
    """An empty, marked temporary folder at `path` (a leftover of an interrupted run is replaced)."""
    _clear(path)
    path.mkdir(parents=True)
    _mark(path)
    return path


def _remove_leftovers(output_dir: Path):
    """Remove the temporary folders an interrupted run of this module left in `output_dir` (and only those)."""
    for entry in sorted(output_dir.glob(".tmp-*")):
        if _written_here(entry):
            logger.warning(f"Removing {entry}, left by an interrupted run.")
            shutil.rmtree(entry, ignore_errors=True)


def _discard_checkpoint(path: Path):
    """Delete a checkpoint folder of this module so that an interruption never leaves a half-deleted `checkpoint-N`
    that looks complete: it is first marked and renamed to `.tmp-deleting-checkpoint-N` (removed at the next start
    if need be). A folder that is neither marked nor a complete checkpoint is refused."""
    if not (_written_here(path) or _is_complete_checkpoint(path)):
        raise FileExistsError(f"{path} was not written by clip_rc.commands.train (no {OWNER_MARKER}); move it away.")
    _mark(path)  # checkpoints written before the marker existed
    doomed = path.with_name(f".tmp-deleting-{path.name}")
    _clear(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _user_entries(output_dir: Path) -> list[str]:
    """Names of the entries of `output_dir` other than leftovers of this module (marked `.tmp-*` folders)."""
    if not output_dir.is_dir():
        return []
    return sorted(
        entry.name for entry in output_dir.iterdir() if not (entry.name.startswith(".tmp-") and _written_here(entry))
    )


def _save_model_files(model: CLIPRCForSemanticSegmentation, processor, directory: Path):
    """config.json, the custom code of the Auto classes and the processor (no weights)."""
    model.config.save_pretrained(directory)
    if getattr(model, "_auto_class", None) is not None:
        custom_object_save(model, directory, config=model.config)
    if processor is not None:
        processor.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _apply_preset(config: CLIPRCConfig, preset: str) -> None:
    """Apply the training recipe of `preset` (setting, loss weights, score calibration) to the config of a loaded
    model; a model with the preset benchmark's classes also takes its zero-shot split, a model with other classes
    keeps its own."""
    recipe = CLIPRCConfig.from_preset(preset)
    if config.num_prompt_tokens != recipe.num_prompt_tokens:
        logger.warning(
            f"The loaded model has {config.num_prompt_tokens} prompt tokens, preset {preset!r} uses "
            f"{recipe.num_prompt_tokens}; keeping the model's."
        )
    names = ["setting", "seen_score_bias", "mask_loss_weight", "dice_loss_weight", "recovery_loss_weight"]
    if config.class_names == recipe.class_names:
        names += ["seen_class_ids", "benchmark"]
    else:
        logger.info(f"The loaded model's {config.num_labels} classes are not those of preset {preset!r}: it keeps its "
                    "classes and zero-shot split, the preset sets the setting and loss weights.")  # fmt: skip
    for name in names:
        setattr(config, name, getattr(recipe, name))


# Config fields set by the class arguments (--class_names, --class_names_file, --unseen_classes, --templates).
_CLASS_FIELDS = {"id2label", "label2id", "seen_class_ids", "prompt_templates", "benchmark"}


def _parsed_overrides(model_args: ModelArguments) -> dict[str, Any]:
    """`--config_overrides` ("key=value,...") as a dict of typed values, refusing unknown fields and the fields the
    class arguments set."""
    text = model_args.config_overrides
    if not text:
        return {}
    keys = [item.split("=", 1)[0].strip() for item in text.split(",")]
    class_fields = sorted(set(keys) & _CLASS_FIELDS)
    if class_fields:
        raise ValueError(
            f"--config_overrides cannot set {class_fields}: give the classes with --class_names / --class_names_file "
            "(or the dataset's id2label.json, or --benchmark), the zero-shot split with --unseen_classes and the "
            "prompt templates with --templates."
        )
    # transformers parses the values by the type of each field of a default configuration.
    typed = CLIPRCConfig()
    try:
        typed.update_from_string(text)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config_overrides {text!r}: {error}") from error
    return {key: getattr(typed, key) for key in keys}


def _load_pretrained(model_class, source: str, cache_dir: str | None):
    """`model_class.from_pretrained(source)`, a local folder checked first, with errors that name the folder."""
    if Path(source).is_dir():
        check_model_folder(source)
    try:
        return model_class.from_pretrained(source, cache_dir=cache_dir)
    except ValueError as error:  # e.g. a bad value in config.json, whose message names the field but not the file
        raise ValueError(f"Cannot load {model_class.__name__} from {source}: {error}") from error


def _load_tokenizer(model_args: ModelArguments):
    """The CLIP tokenizer saved with the processor, or `None` (with a warning) when the default place has none."""
    source = model_args.tokenizer_name_or_path or model_args.clip_model_name_or_path or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir)
    except (OSError, ValueError, TypeError) as error:
        if model_args.tokenizer_name_or_path is not None:
            raise
        logger.warning(f"No tokenizer found at {source} ({type(error).__name__}); the saved processor will hold the "
                       "image processor only.")  # fmt: skip
        return None


def training_class_list(
    model_args: ModelArguments, data_args: DataArguments, config: CLIPRCConfig | None = None
) -> ClassList:
    """
    The classes to train on and their zero-shot split. The class list comes from, in this order: `--class_names` /
    `--class_names_file`, the `id2label.json` of the dataset repository, `--benchmark`, and then the loaded model's
    classes (`config`) or the benchmark of `--preset` (from CLIP). The split is `--unseen_classes` (names or ids),
    else the loaded model's when the list is its own, else the benchmark's when the list is a benchmark's, else none.
    """
    requested = class_names_from_arguments(data_args.class_names, data_args.class_names_file)
    requested = requested or dataset_class_names(data_args.dataset, model_args.cache_dir)
    if requested is None and data_args.benchmark is not None:
        requested = get_benchmark(data_args.benchmark).class_names, f"--benchmark {data_args.benchmark}"
    default_unseen = None
    if requested is not None:
        names, source = requested
        if config is not None and list(names) == config.class_names:
            default_unseen = config.unseen_class_ids
    elif config is not None:
        names, source, default_unseen = config.class_names, "the loaded model", config.unseen_class_ids
    else:
        benchmark = get_benchmark(model_args.preset.rpartition("-")[0])
        names, source = benchmark.class_names, f"benchmark {benchmark.name} of preset {model_args.preset}"
    return class_list(names, source, data_args.unseen_classes, default_unseen)


def _check_split_fits_setting(setting: str, classes: ClassList):
    if setting == "transductive" and not classes.unseen_class_ids:
        raise ValueError(
            f"The transductive setting pseudo-labels unseen classes, but the {len(classes.names)} classes of "
            f"{classes.source} have no zero-shot split: pass --unseen_classes (names or ids)."
        )
    if setting == "inductive" and not classes.unseen_class_ids:
        logger.warning(f"Every one of the {len(classes.names)} classes of {classes.source} is seen: no zero-shot "
                       "split (pass --unseen_classes), so unseen mIoU and hIoU are not defined.")  # fmt: skip


def _class_config_values(classes: ClassList, templates: list[str] | None) -> dict[str, Any]:
    """The config fields of a class list: id2label, label2id, the split, the benchmark name and the templates."""
    values = {
        "id2label": dict(enumerate(classes.names)),
        "label2id": {name: class_id for class_id, name in enumerate(classes.names)},
        "seen_class_ids": list(classes.seen_class_ids) if classes.unseen_class_ids else None,
        "benchmark": classes.benchmark_name,
    }
    if templates:
        values["prompt_templates"] = list(check_templates(templates, field="--templates"))
    return values


def _model_from_clip(model_args, data_args, overrides, tokenizer) -> tuple[CLIPRCForSemanticSegmentation, ClassList]:
    """CLIP-RC initialised from CLIP with the preset's recipe, the class embeddings of the class list encoded once."""
    if model_args.preset is None:
        raise ValueError("Starting from CLIP needs --preset (one of " + ", ".join(PRESETS) + ").")
    classes = training_class_list(model_args, data_args)
    _check_split_fits_setting(overrides.get("setting", model_args.preset.rpartition("-")[2]), classes)
    clip = _load_pretrained(transformers.CLIPModel, model_args.clip_model_name_or_path, model_args.cache_dir)
    values = dict(overrides)
    if model_args.crop_size is not None:
        values["crop_size"] = model_args.crop_size
        if model_args.sliding_window_stride is None and "sliding_window_stride" not in values:
            values["sliding_window_stride"] = window_stride(model_args.crop_size)
    if model_args.sliding_window_stride is not None:
        values["sliding_window_stride"] = model_args.sliding_window_stride
    values.update(
        vision_config=clip.config.vision_config.to_dict(),
        text_config=clip.config.text_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        **_class_config_values(classes, model_args.templates),
    )
    config = CLIPRCConfig.from_preset(model_args.preset, **values)
    if tokenizer is None:
        raise ValueError(
            "Starting from CLIP needs its tokenizer to compute the class embeddings once; none found at "
            f"{model_args.clip_model_name_or_path}: pass --tokenizer_name_or_path."
        )
    processor = CLIPRCProcessor(CLIPRCImageProcessor.from_model_config(config), tokenizer)
    model = CLIPRCForSemanticSegmentation.from_clip(clip, config, processor=processor)
    del clip
    return model, classes


def _apply_class_list(model: CLIPRCForSemanticSegmentation, classes: ClassList, templates, tokenizer):
    """Give a loaded model the class list (re-encoded with its text tower when names or templates change), its
    zero-shot split and benchmark name."""
    config = model.config
    templates = list(check_templates(templates, field="--templates")) if templates else list(config.prompt_templates)
    if list(classes.names) != config.class_names or templates != list(config.prompt_templates):
        if tokenizer is None:
            raise ValueError(
                f"Training the loaded model on the classes of {classes.source} re-encodes them with its text tower, "
                "which needs its tokenizer; none was found: pass --tokenizer_name_or_path."
            )
        logger.info(f"Encoding the {len(classes.names)} classes of {classes.source} with the model's text tower.")
        image_processor = CLIPRCImageProcessor.from_model_config(config)
        with torch.no_grad():
            text_embeds = encode_class_names(model, image_processor, tokenizer, classes.names, templates)
        model.set_class_embeddings(text_embeds, list(classes.names))
        config.prompt_templates = templates
    values = _class_config_values(classes, None)
    config.seen_class_ids, config.benchmark = values["seen_class_ids"], values["benchmark"]


def _model_from_weights(
    model_args, data_args, overrides, tokenizer
) -> tuple[CLIPRCForSemanticSegmentation, ClassList]:
    """A saved CLIP-RC model with the preset's recipe, the overrides and the class list applied."""
    model = _load_pretrained(CLIPRCForSemanticSegmentation, model_args.model_name_or_path, model_args.cache_dir)
    config = model.config
    if model_args.preset is not None:
        _apply_preset(config, model_args.preset)
    if model_args.crop_size is not None and model_args.crop_size != config.crop_size:
        raise ValueError(
            f"--crop_size {model_args.crop_size} differs from the loaded model's crop_size {config.crop_size}, which "
            "sizes its position table; train at the model's crop size."
        )
    architecture = {"vision_config", "text_config", "projection_dim", "crop_size", "num_prompt_tokens",
                    "region_grid_size", "decoder_hidden_size", "decoder_num_attention_heads", "decoder_num_layers",
                    "decoder_intermediate_size", "recovery_num_layers"}  # fmt: skip
    fixed = sorted(set(overrides) & architecture)
    if fixed:
        raise ValueError(f"--config_overrides cannot change the architecture of a loaded model: {fixed}.")
    for key, value in overrides.items():
        setattr(config, key, value)
    if model_args.sliding_window_stride is not None:
        config.sliding_window_stride = model_args.sliding_window_stride
    if "setting" in overrides and "seen_score_bias" not in overrides and model_args.preset is None:
        config.seen_score_bias = {"transductive": 0.0}.get(config.setting, 0.1)
    classes = training_class_list(model_args, data_args, config)
    _check_split_fits_setting(config.setting, classes)
    _apply_class_list(model, classes, model_args.templates, tokenizer)
    config._validate()
    model.freeze_clip()
    if not bool(model.class_embeddings.abs().sum() > 0):
        raise ValueError(f"{model_args.model_name_or_path} holds no class embeddings (set_class_embeddings).")
    return model, classes


def build_model(
    model_args: ModelArguments, data_args: DataArguments
) -> tuple[CLIPRCForSemanticSegmentation, Any, ClassList]:
    """The model to train, its tokenizer (or `None`) and the class list it trains on (see [`training_class_list`])."""
    overrides = _parsed_overrides(model_args)
    if (model_args.clip_model_name_or_path is None) == (model_args.model_name_or_path is None):
        raise ValueError(
            "Give exactly one of --clip_model_name_or_path (start from CLIP) and --model_name_or_path "
            "(start from CLIP-RC weights)."
        )
    tokenizer = _load_tokenizer(model_args)
    if model_args.clip_model_name_or_path is not None:
        model, classes = _model_from_clip(model_args, data_args, overrides, tokenizer)
    else:
        model, classes = _model_from_weights(model_args, data_args, overrides, tokenizer)
    return model, tokenizer, classes


def build_processor(model: CLIPRCForSemanticSegmentation, tokenizer, eval_shortest_edge: int):
    """A [`CLIPRCProcessor`] (or only a [`CLIPRCImageProcessor`] without tokenizer) for the trained model."""
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    image_processor.size = {"shortest_edge": eval_shortest_edge}
    if tokenizer is None:
        return image_processor
    return CLIPRCProcessor(
        image_processor=image_processor, tokenizer=tokenizer, templates=model.config.prompt_templates
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def _summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of [`SegmentationMetric.compute`] (mIoU, seen / unseen / harmonic IoU, accuracies)."""
    keys = ("mean_iou", "mean_iou_seen", "mean_iou_unseen", "harmonic_iou", "overall_accuracy", "mean_accuracy")
    return {key: float(results[key]) for key in keys}


# ---------------------------------------------------------------------------------------------------------------
# Model card and Hub
# ---------------------------------------------------------------------------------------------------------------


def push_to_hub(output_dir: Path, hub_model_id: str | None, private: bool = False) -> str:
    """Create (exist_ok) the Hub repository and upload `output_dir` without its checkpoints."""
    api = HfApi()
    repo_id = hub_model_id or output_dir.resolve().name
    repo_url = api.create_repo(repo_id=repo_id, exist_ok=True, private=private)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Upload CLIP-RC trained with clip_rc.commands.train",
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{CHECKPOINT_PREFIX}*/**", ".tmp-*", ".tmp-*/**"],
    )
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# Run plan, logging, data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Resolved run parameters."""

    preset: str | None
    max_steps: int
    per_device_train_batch_size: int
    total_train_batch_size: int
    warmup_steps: int
    lr_decay_steps: int
    eval_steps: int
    checkpointing_steps: int


def _resolve_plan(model_args, training_args, config: CLIPRCConfig, num_processes: int) -> _Plan:
    preset = model_args.preset
    if preset is None and config.benchmark and f"{config.benchmark}-{config.setting}" in RECIPES:
        preset = f"{config.benchmark}-{config.setting}"
    recipe = RECIPES.get(preset)
    max_steps = training_args.max_steps if training_args.max_steps is not None else getattr(recipe, "max_steps", None)
    if max_steps is None:
        raise ValueError("No recipe applies to this model: pass --max_steps (and --total_train_batch_size).")
    if max_steps < 0:
        raise ValueError(f"--max_steps must be >= 0, got {max_steps}.")
    accumulation = training_args.gradient_accumulation_steps
    if accumulation < 1:
        raise ValueError("--gradient_accumulation_steps must be at least 1.")
    if training_args.per_device_train_batch_size is not None:
        per_device = training_args.per_device_train_batch_size
        total = per_device * num_processes * accumulation
        if recipe and training_args.total_train_batch_size is None and total != recipe.total_train_batch_size:
            logger.warning(f"{total} images per iteration; the {preset} recipe uses {recipe.total_train_batch_size}.")
    else:
        total = training_args.total_train_batch_size or getattr(recipe, "total_train_batch_size", None)
        if total is None:
            raise ValueError("Pass --per_device_train_batch_size or --total_train_batch_size.")
        if total % (num_processes * accumulation):
            raise ValueError(
                f"{total} images per iteration cannot be split over {num_processes} processes x {accumulation} "
                "accumulation steps; pass --per_device_train_batch_size."
            )
        per_device = total // (num_processes * accumulation)
    if per_device < 1:
        raise ValueError("The per-device batch size must be at least 1.")

    reference_steps = recipe.max_steps if recipe else max_steps
    if training_args.scale_lr_schedule:
        decay = max_steps
        warmup = round(WARMUP_ITERATIONS * max_steps / reference_steps) if reference_steps else 0
    else:
        decay = reference_steps
        warmup = WARMUP_ITERATIONS
    if training_args.lr_decay_steps is not None:
        decay = training_args.lr_decay_steps
    if training_args.warmup_steps is not None:
        warmup = training_args.warmup_steps
    interval = max(reference_steps // 10, 1)
    eval_steps = training_args.eval_steps if training_args.eval_steps is not None else interval
    checkpointing_steps = (
        training_args.checkpointing_steps if training_args.checkpointing_steps is not None else interval
    )
    return _Plan(preset, max_steps, per_device, total, warmup, max(decay, 1), eval_steps, checkpointing_steps)


def _setup_logging(accelerator: Accelerator):
    setup_logging(accelerator.is_local_main_process)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _tracker_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as TensorBoard's add_hparams accepts them (scalars and strings)."""
    values = {}
    for key, value in recipe.items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
    return values


def _load_datasets(data_args: DataArguments, config: CLIPRCConfig):
    """The training and evaluation splits, their label ids checked against the model's classes."""
    benchmark = data_args.benchmark or (config.benchmark if config.benchmark in BENCHMARKS else None)
    if benchmark is not None and get_benchmark(benchmark).num_classes != config.num_labels:
        raise ValueError(
            f"Benchmark {benchmark} has {get_benchmark(benchmark).num_classes} classes, the model {config.num_labels}."
        )
    loaded = load_segmentation_dataset(
        data_args.dataset,
        benchmark=benchmark,
        data_dir=data_args.data_dir,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        label_mapping=data_args.label_mapping,
        num_classes=config.num_labels,
    )
    if data_args.train_split not in loaded:
        raise ValueError(f"No split {data_args.train_split!r} in {data_args.dataset}; splits: {list(loaded)}.")
    train = loaded[data_args.train_split]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    eval_split = data_args.eval_split
    if eval_split is None:
        eval_split = next((name for name in ("val", "validation") if name in loaded), None)
    elif eval_split.lower() == "none":
        eval_split = None
    elif eval_split not in loaded:
        raise ValueError(f"No split {eval_split!r} in {data_args.dataset}; splits: {list(loaded)}.")
    evaluation = loaded[eval_split] if eval_split is not None else None
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation, eval_split


# ---------------------------------------------------------------------------------------------------------------
# Output folder, resuming, non-finite numbers
# ---------------------------------------------------------------------------------------------------------------


class TrainingDivergedError(RuntimeError):
    """The loss or the weights stopped being finite. Nothing is saved from that point on: the output folder keeps the
    checkpoints written before."""


# Recipe entries that may differ between a checkpoint and the run resuming it: where things go, how often they are
# logged, evaluated or saved, and raw arguments whose effect is compared through their `resolved.*` values.
_RESUMABLE_CHANGES = frozenset({
    "train.output_dir", "train.overwrite_output_dir", "train.resume_from_checkpoint", "train.allow_inexact_resume",
    "train.max_steps", "resolved.max_steps", "train.logging_steps", "train.eval_steps", "resolved.eval_steps",
    "train.final_evaluation", "train.checkpointing_steps", "resolved.checkpointing_steps",
    "train.checkpoints_total_limit", "train.report_to", "train.tracker_project_name", "train.dataloader_num_workers",
    "train.gradient_checkpointing", "train.ddp_find_unused_parameters", "train.push_to_hub", "train.hub_model_id",
    "train.hub_private_repo", "model.cache_dir", "data.eval_split", "resolved.eval_split", "data.max_eval_samples",
    "data.eval_shortest_edge", "model.preset", "train.total_train_batch_size", "train.per_device_train_batch_size",
    "train.warmup_steps", "train.lr_decay_steps", "train.scale_lr_schedule",
})  # fmt: skip
# What checkpoints written before the recipe was saved in them record, under the recipe's names.
_LEGACY_STATE_KEYS = {
    "seed": "train.seed",
    "num_processes": "resolved.num_processes",
    "per_device_train_batch_size": "resolved.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
}


def _resume_path(training_args: TrainingArguments, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, `None` for a fresh start."""
    if not training_args.resume_from_checkpoint:
        return None
    if training_args.resume_from_checkpoint == "latest":
        resume_path = find_latest_checkpoint(output_dir)
        if resume_path is None:
            logger.info(f"No complete checkpoint in {output_dir}: starting from scratch.")
        return resume_path
    resume_path = Path(training_args.resume_from_checkpoint)
    if not _is_complete_checkpoint(resume_path):
        raise ValueError(f"{resume_path} is not a complete checkpoint (no {TRAINING_STATE_NAME}).")
    return resume_path


def _prepare_output_dir(output_dir: Path, resume_path: Path | None, overwrite: bool, accelerator: Accelerator):
    """
    Refuse a non-empty `output_dir` unless resuming from one of its checkpoints or `overwrite` (as
    `transformers.Trainer`); then remove the leftovers of an interrupted run of this module and, when starting afresh
    with `overwrite`, the checkpoints of the earlier run. Nothing this module did not write is deleted.
    """
    resuming_here = resume_path is not None and resume_path.resolve().parent == output_dir.resolve()
    earlier_checkpoints = list_checkpoints(output_dir) if resume_path is None else []
    if not resuming_here and not overwrite:
        if earlier_checkpoints:
            raise ValueError(
                f"{output_dir} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest to continue "
                "it or --overwrite_output_dir to start afresh."
            )
        occupied = _user_entries(output_dir)
        if occupied:
            raise ValueError(
                f"{output_dir} is not empty (it holds {', '.join(occupied[:10])}"
                f"{', ...' if len(occupied) > 10 else ''}): choose another --output_dir, or pass "
                "--overwrite_output_dir to train into it (the final save replaces files of the names it writes; a "
                "README.md not written by clip_rc.commands.train is kept)."
            )
    foreign = [name for name in _user_entries(output_dir) if _TEMPORARY_PATTERN.match(name)]
    if foreign:
        raise ValueError(
            f"{output_dir} holds {foreign}, named like the temporary folders of clip_rc.commands.train but not written by "
            "it; move them away."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(output_dir)
        for old in earlier_checkpoints:
            _discard_checkpoint(old)
    accelerator.wait_for_everyone()


def _read_training_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINING_STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot resume: {path} is unreadable ({error}).") from error
    missing = [key for key in ("global_step", "consumed_samples") if key not in state]
    if missing:
        raise ValueError(f"Cannot resume: {path} lacks {missing}.")
    return state


def _recipe_changes(state: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """`key: saved -> now` for every recipe entry that differs from the checkpoint's and matters for resuming."""
    saved = state.get("recipe")
    if saved is None:
        saved = {name: state[key] for key, name in _LEGACY_STATE_KEYS.items() if key in state}
    current = json.loads(json.dumps(json_ready(recipe), default=str))
    return [
        f"{key}: {saved[key]!r} -> {current[key]!r}"
        for key in sorted(set(saved) & set(current))
        if key not in _RESUMABLE_CHANGES and saved[key] != current[key]
    ]


def _unreadable_random_states(checkpoint: Path, num_processes: int) -> list[str]:
    """The random-number state files of `checkpoint` (one per process) that are missing or cannot be read by
    Accelerate (which would skip them without an error)."""
    from accelerate.utils import load as accelerate_load
    from accelerate.utils.constants import RNG_STATE_NAME

    problems = []
    for process_index in range(num_processes):
        path = checkpoint / f"{RNG_STATE_NAME}_{process_index}.pkl"
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            states = accelerate_load(path)
            if not isinstance(states, dict) or "torch_manual_seed" not in states:
                raise ValueError("not a random-state record")
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the state cannot be restored
            first_line = (str(error).strip().splitlines() or [""])[0]
            problems.append(f"{path} is unreadable ({type(error).__name__}: {first_line})")
    return problems


def _check_resume(checkpoint: Path, recipe: dict[str, Any], num_processes: int, allow_inexact: bool) -> dict:
    """The checkpoint's training state, after checking that resuming from it continues the run exactly: same recipe,
    every random-number state readable. Either problem is an error unless `allow_inexact` (then a warning)."""
    state = _read_training_state(checkpoint)
    problems = []
    changes = _recipe_changes(state, recipe)
    if changes:
        problems.append("the recipe differs from the checkpoint's: " + "; ".join(changes))
    problems += _unreadable_random_states(checkpoint, num_processes)
    if problems and not allow_inexact:
        raise ValueError(
            f"Cannot resume exactly from {checkpoint}: " + "; ".join(problems) + ". Pass --allow_inexact_resume to "
            "resume anyway, or start afresh in another --output_dir."
        )
    for problem in problems:
        logger.warning(f"Resuming inexactly from {checkpoint}: {problem}.")
    return state


def _stop_if_loss_not_finite(accelerator: Accelerator, losses: dict[str, torch.Tensor], step: int, lr: float):
    """Raise [`TrainingDivergedError`] on every process when the loss of any process is not finite (so that no process
    waits for the others, and nothing is saved from the diverged weights)."""
    finite = torch.isfinite(losses["loss"].detach()).all().to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite).min()
    if bool(finite.item()):
        return
    values = ", ".join(f"{name}={float(value.detach()):.6g}" for name, value in losses.items())
    raise TrainingDivergedError(
        f"The loss is not finite at iteration {step} ({values}; learning rate {lr:.3g}): training stopped, nothing "
        "is saved from this point, and the output folder keeps the checkpoints written before. Lower "
        "--learning_rate or set --max_grad_norm."
    )


def _check_finite_weights(model: torch.nn.Module, what: str):
    """Refuse to save `what` when a weight of `model` is not finite."""
    bad = non_finite_tensors(model.state_dict())
    if bad:
        listing = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise TrainingDivergedError(
            f"Not saving {what}: {len(bad)} tensors of the model hold NaN or infinite values ({listing})."
        )


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def _mixed_precision(training_args: TrainingArguments) -> str | None:
    """Accelerate's mixed precision: `--dtype` resolved for this machine, else `--mixed_precision`."""
    if training_args.dtype is None:
        return training_args.mixed_precision
    if training_args.mixed_precision is not None:
        raise ValueError("Give at most one of --dtype and --mixed_precision.")
    device_type = accelerator_device_type(cpu=launched_without_accelerator())
    return mixed_precision_of(resolve_dtype(training_args.dtype, device_type))


def _build_accelerator(training_args: TrainingArguments, output_dir: Path, report_to: str | None) -> Accelerator:
    return Accelerator(
        # Several processes started by a launcher (`accelerate launch --multi_gpu`, torchrun) on a machine without
        # an accelerator: run them as one gloo process group (Accelerate's MULTI_CPU) instead of independent runs.
        cpu=launched_without_accelerator(),
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(training_args),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=training_args.ddp_find_unused_parameters, broadcast_buffers=False
            )
        ],
    )


def _training_samples(train_dataset, config: CLIPRCConfig, data_args: DataArguments, seed: int):
    """The training split behind the reference augmentation, each sample drawing from its own seeded generator."""
    crop = config.crop_size
    scale = tuple(data_args.train_scale) if data_args.train_scale else train_scale(crop)
    if len(scale) != 2:
        raise ValueError(f"--train_scale takes two sizes (long short), got {list(scale)}.")
    transform = SegmentationTrainTransform(
        crop_size=crop, scale=scale, photometric=data_args.photometric_distortion, ignore_index=config.ignore_index
    )
    return AugmentedTrainSamples(train_dataset, transform, seed)


def _build_optimizer(model, training_args: TrainingArguments, plan: _Plan):
    """AdamW over the reference's parameter groups and the poly schedule with warm-up; also returns the groups."""
    groups = reference_parameter_groups(
        model, training_args.learning_rate, training_args.weight_decay, training_args.lr_multiplier
    )
    optimizer = torch.optim.AdamW(
        [{key: value for key, value in group.items() if key != "param_names"} for group in groups],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
    )
    lr_scheduler = PolyWarmupLR(
        optimizer, total_steps=plan.lr_decay_steps, warmup_steps=plan.warmup_steps,
        warmup_ratio=training_args.warmup_lr_ratio, power=training_args.lr_power,
        min_lr=training_args.min_learning_rate,
    )  # fmt: skip
    return optimizer, lr_scheduler, groups


def _recipe(model_args, data_args, training_args, plan: _Plan, config, groups, num_processes, eval_split) -> dict:
    """Every argument and resolved value of the run (saved with the model and in each checkpoint)."""
    return {
        **{f"model.{k}": v for k, v in dataclasses.asdict(model_args).items()},
        **{f"data.{k}": v for k, v in dataclasses.asdict(data_args).items()},
        **{f"train.{k}": v for k, v in dataclasses.asdict(training_args).items()},
        "resolved.preset": plan.preset,
        "resolved.max_steps": plan.max_steps,
        "resolved.per_device_train_batch_size": plan.per_device_train_batch_size,
        "resolved.total_train_batch_size": plan.per_device_train_batch_size * num_processes
        * training_args.gradient_accumulation_steps,
        "resolved.num_processes": num_processes,
        "resolved.warmup_steps": plan.warmup_steps,
        "resolved.lr_decay_steps": plan.lr_decay_steps,
        "resolved.eval_steps": plan.eval_steps,
        "resolved.checkpointing_steps": plan.checkpointing_steps,
        "resolved.setting": config.setting,
        "resolved.loss_weights": [config.mask_loss_weight, config.dice_loss_weight, config.recovery_loss_weight],
        "resolved.param_groups": {g["name"]: {"lr": g["lr"], "weight_decay": g["weight_decay"],
                                              "num_tensors": len(g["params"])} for g in groups},
        "resolved.eval_split": eval_split,
    }  # fmt: skip


_LOSS_NAMES = ("loss", "loss_focal", "loss_dice", "loss_recovery_query", "loss_recovery_pixel")


@dataclass
class _TrainingRun:
    """The state of one run and its stages: resume, the training loop (with logging, evaluation and checkpoints) and
    the final save."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: PolyWarmupLR
    processor: Any
    train_samples: AugmentedTrainSamples
    eval_dataset: Any
    eval_split: str | None
    plan: _Plan
    training_args: TrainingArguments
    recipe: dict[str, Any]
    group_names: list[str]
    output_dir: Path
    report_to: str | None
    global_step: int = 0
    consumed_samples: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    last_metrics: dict[str, float] | None = None
    last_table: str | None = None

    @property
    def unwrapped(self) -> CLIPRCForSemanticSegmentation:
        return self.accelerator.unwrap_model(self.model)

    def resume(self, checkpoint: Path):
        state = _check_resume(
            checkpoint, self.recipe, self.accelerator.num_processes, self.training_args.allow_inexact_resume
        )
        logger.info(f"Resuming from {checkpoint}")
        self.accelerator.load_state(str(checkpoint))
        self.global_step, self.consumed_samples = state["global_step"], state["consumed_samples"]
        self.log_history = state.get("log_history", [])

    def log_metrics(self, values: dict[str, float], step: int):
        self.log_history.append({"step": step, **values})
        if self.report_to is not None:
            self.accelerator.log(values, step=step)

    def save_checkpoint(self, step: int):
        """`checkpoint-{step}`, written to a marked temporary folder and renamed when complete."""
        accelerator, output_dir = self.accelerator, self.output_dir
        _check_finite_weights(self.unwrapped, f"checkpoint-{step}")
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        temporary = output_dir / f"{TMP_CHECKPOINT_PREFIX}{step}"
        if accelerator.is_main_process:
            _fresh_temporary_folder(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_model_files(self.unwrapped, self.processor, temporary)
            epoch, position = divmod(self.consumed_samples, len(self.train_samples))
            write_json_atomic(temporary / TRAINING_STATE_NAME, {
                "global_step": step,
                "consumed_samples": self.consumed_samples,
                "epoch": epoch,
                "position_in_epoch": position,
                "num_processes": accelerator.num_processes,
                "per_device_train_batch_size": self.plan.per_device_train_batch_size,
                "gradient_accumulation_steps": self.training_args.gradient_accumulation_steps,
                "seed": self.training_args.seed,
                "recipe": self.recipe,
                "log_history": self.log_history,
            })  # fmt: skip
            if final.exists():  # an incomplete folder of the same name (complete ones are never rewritten)
                _discard_checkpoint(final)
            os.replace(temporary, final)
            logger.info(f"Saved checkpoint {final}")
            self._apply_checkpoint_limit()
        accelerator.wait_for_everyone()

    def _apply_checkpoint_limit(self):
        limit = self.training_args.checkpoints_total_limit
        if limit is None:
            return
        checkpoints = list_checkpoints(self.output_dir)
        for old in checkpoints[: max(len(checkpoints) - limit, 0)]:
            logger.info(f"Removing old checkpoint {old}")
            _discard_checkpoint(old)

    def run_evaluation(self, step: int):
        # Every process scores its shard; all get the same figures.
        results = evaluate_model(
            self.model, self.eval_dataset, image_processor=getattr(self.processor, "image_processor", self.processor),
            accelerator=self.accelerator, num_workers=self.training_args.dataloader_num_workers, batch_size=1,
        )  # fmt: skip
        self.last_metrics = _summary_metrics(results)
        self.last_table = format_results_table(results, results["class_names"])
        logger.info(f"Evaluation at step {step} on {self.eval_split}:\n{self.last_table}")
        self.log_metrics({f"eval/{key}": value for key, value in self.last_metrics.items()}, step)

    def _train_loader(self) -> torch.utils.data.DataLoader:
        accelerator, plan = self.accelerator, self.plan
        sampler = InfiniteShardedBatchSampler(
            len(self.train_samples), plan.per_device_train_batch_size, accelerator.num_processes,
            accelerator.process_index, seed=self.training_args.seed, start_sample=self.consumed_samples,
        )  # fmt: skip
        return torch.utils.data.DataLoader(
            self.train_samples, batch_sampler=sampler, collate_fn=collate_fn,
            num_workers=self.training_args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, generator=torch.Generator().manual_seed(self.training_args.seed),
        )  # fmt: skip

    def train(self):
        """Optimiser updates until `plan.max_steps`, with periodic logging, evaluation and checkpoints."""
        accelerator, plan, training_args = self.accelerator, self.plan, self.training_args
        progress = tqdm(
            total=plan.max_steps, initial=self.global_step, desc="training", dynamic_ncols=True,
            # Main process: tqdm's own rule (no bar when stderr is not a terminal; the losses are logged).
            disable=None if accelerator.is_local_main_process else True,
        )  # fmt: skip
        trainable = [p for p in self.unwrapped.parameters() if p.requires_grad]
        running = torch.zeros(len(_LOSS_NAMES), device=accelerator.device, dtype=torch.float64)
        running_count = 0
        data_iterator = iter(self._train_loader()) if self.global_step < plan.max_steps else None
        started, first_step = time.time(), self.global_step
        self.model.train()
        while self.global_step < plan.max_steps:
            losses = self._forward_backward(next(data_iterator), trainable)
            self.consumed_samples += plan.per_device_train_batch_size * accelerator.num_processes
            running += torch.stack([losses[name].detach().double() for name in _LOSS_NAMES])
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            learning_rates = [group["lr"] for group in self.optimizer.param_groups]
            self.lr_scheduler.step()
            self.global_step += 1
            progress.update(1)
            if self.global_step % training_args.logging_steps == 0 or self.global_step == plan.max_steps:
                self._log_losses(running / running_count, learning_rates, progress)
                running.zero_()
                running_count = 0
            self._evaluate_and_save_if_due()
        progress.close()
        if self.global_step > first_step:
            logger.info(f"Training done: {self.global_step} iterations in {time.time() - started:.1f}s")

    def _forward_backward(self, batch: dict[str, torch.Tensor], trainable: list[torch.nn.Parameter]):
        """One micro-batch: forward, stop on a non-finite loss, backward, optimiser step when gradients sync."""
        accelerator, training_args = self.accelerator, self.training_args
        pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        labels = batch["labels"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(self.model):
            outputs = self.model(pixel_values=pixel_values, labels=labels)
            losses = {"loss": outputs.loss, **{name: outputs.loss_dict[name] for name in _LOSS_NAMES[1:]}}
            _stop_if_loss_not_finite(accelerator, losses, self.global_step + 1, self.optimizer.param_groups[0]["lr"])
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients and training_args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, training_args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _log_losses(self, sums_per_step: torch.Tensor, learning_rates: list[float], progress):
        means = self.accelerator.reduce(sums_per_step, reduction="mean").tolist()
        values = {f"train/{name}": value for name, value in zip(_LOSS_NAMES, means)}
        values.update({f"train/lr_{name}": lr for name, lr in zip(self.group_names, learning_rates)})
        values["train/epoch"] = self.consumed_samples / len(self.train_samples)
        self.log_metrics(values, self.global_step)
        progress.set_postfix(loss=f"{means[0]:.4f}", lr=f"{learning_rates[0]:.3g}")
        logger.info(f"step {self.global_step}: " + ", ".join(f"{k.split('/')[-1]}={v:.6g}" for k, v in values.items()))

    def _evaluate_and_save_if_due(self):
        step, plan = self.global_step, self.plan
        if (
            self.eval_dataset is not None
            and plan.eval_steps > 0
            and step % plan.eval_steps == 0
            and step < plan.max_steps
        ):
            self.run_evaluation(step)
        if plan.checkpointing_steps > 0 and step % plan.checkpointing_steps == 0:
            self.save_checkpoint(step)

    def finish(self) -> dict[str, Any]:
        """Final evaluation, the final save (and upload); returns the run's summary."""
        accelerator = self.accelerator
        if self.eval_dataset is not None and self.training_args.final_evaluation:
            self.run_evaluation(self.global_step)
        _check_finite_weights(self.unwrapped, f"the final model to {self.output_dir}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_final(self.unwrapped, self.processor, self.output_dir, self.recipe, self.last_metrics,
                        self.last_table, self.log_history, self.global_step, self.training_args)  # fmt: skip
        accelerator.wait_for_everyone()
        repo_id = None
        if self.training_args.push_to_hub and accelerator.is_main_process:
            repo_id = push_to_hub(
                self.output_dir, self.training_args.hub_model_id, self.training_args.hub_private_repo
            )
            logger.info(f"Pushed {self.output_dir} to {repo_id}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {
            "global_step": self.global_step,
            "metrics": self.last_metrics,
            "log_history": self.log_history,
            "output_dir": str(self.output_dir),
            "repo_id": repo_id,
            "recipe": self.recipe,
        }

    def log_start(self, config: CLIPRCConfig):
        plan, training_args = self.plan, self.training_args
        logger.info("***** Running training *****")
        logger.info(
            f"  Recipe = {plan.preset}, setting = {config.setting}, classes = {config.num_labels} "
            f"({self.recipe['resolved.class_names_source']}), unseen = "
            f"{[config.id2label[i] for i in config.unseen_class_ids]}"
        )
        logger.info(
            f"  Training samples = {len(self.train_samples)}, evaluation samples = "
            f"{len(self.eval_dataset) if self.eval_dataset is not None else 0}"
        )
        logger.info(
            f"  Iterations = {plan.max_steps}, per-device batch = {plan.per_device_train_batch_size}, "
            f"processes = {self.accelerator.num_processes}, accumulation = "
            f"{training_args.gradient_accumulation_steps}"
        )
        logger.info(f"  Parameter groups = {self.recipe['resolved.param_groups']}")
        logger.info(
            f"  Schedule: poly {training_args.lr_power} over {plan.lr_decay_steps} iterations to "
            f"{training_args.min_learning_rate}, linear warm-up {plan.warmup_steps} from "
            f"{training_args.warmup_lr_ratio}"
        )


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Train CLIP-RC (see the module docstring). Returns the run's summary (steps, final metrics, log history, recipe,
    output folder, Hub repository)."""
    model_args, data_args, training_args = parse_args(argv)
    output_dir = Path(training_args.output_dir)
    report_to = None if training_args.report_to == "none" else training_args.report_to
    accelerator = _build_accelerator(training_args, output_dir, report_to)
    _setup_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    resume_path = _resume_path(training_args, output_dir)
    _prepare_output_dir(output_dir, resume_path, training_args.overwrite_output_dir, accelerator)

    set_seed(training_args.seed)
    model, tokenizer, classes = build_model(model_args, data_args)
    if training_args.gradient_checkpointing:
        # `gradient_checkpointing_enable` became `activation_checkpointing_enable` during transformers 5.x.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    config = model.config
    plan = _resolve_plan(model_args, training_args, config, accelerator.num_processes)
    eval_shortest_edge = data_args.eval_shortest_edge or config.crop_size
    processor = build_processor(model, tokenizer, eval_shortest_edge)
    with accelerator.main_process_first():
        train_dataset, eval_dataset, eval_split = _load_datasets(data_args, config)
    train_samples = _training_samples(train_dataset, config, data_args, training_args.seed)
    optimizer, lr_scheduler, groups = _build_optimizer(model, training_args, plan)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    recipe = _recipe(model_args, data_args, training_args, plan, config, groups, accelerator.num_processes, eval_split)
    recipe["resolved.class_names_source"] = classes.source

    run = _TrainingRun(
        accelerator, model, optimizer, lr_scheduler, processor, train_samples, eval_dataset, eval_split, plan,
        training_args, recipe, [group["name"] for group in groups], output_dir, report_to,
    )  # fmt: skip
    if resume_path is not None:
        run.resume(resume_path)
    if report_to is not None:
        accelerator.init_trackers(training_args.tracker_project_name, config=_tracker_config(recipe))
    run.log_start(config)
    run.train()
    return run.finish()


def main(argv: list[str] | None = None) -> int:
    """`clip-rc-train` / `train_accelerate.py`: train (see [`train`]); returns the exit status, 0 on success (errors
    raise)."""
    train(argv)
    return 0


def _save_final(model, processor, output_dir: Path, recipe, metrics, table, log_history, global_step, training_args):
    """save_pretrained (model + processor), model card and run records into `output_dir`, atomically for loaders:
    everything is written to a marked temporary folder, moved in, and `config.json` (what `from_pretrained` looks
    for) is removed first and moved in last, so a folder with a config.json always has complete weights. A README.md
    this module did not write is kept (the model card is then not written)."""
    temporary = _fresh_temporary_folder(output_dir / ".tmp-final")
    model.save_pretrained(temporary)
    if processor is not None:
        processor.save_pretrained(temporary)
    readme = output_dir / "README.md"
    if readme.exists() and MODEL_CARD_MARKER not in readme.read_text(encoding="utf-8", errors="replace"):
        logger.warning(f"Keeping {readme}, which clip_rc.commands.train did not write: the model card is not saved.")
    else:
        repo_id = training_args.hub_model_id if training_args.push_to_hub else None
        card = build_model_card(model.config, recipe, metrics, table, repo_id, recipe.get("resolved.eval_split"))
        card.save(temporary / "README.md")
    write_json_atomic(temporary / "training_args.json", recipe)
    write_json_atomic(temporary / "trainer_state.json", {"global_step": global_step, "log_history": log_history})
    if metrics is not None:
        write_json_atomic(temporary / "eval_results.json", metrics)
    config_file = output_dir / "config.json"
    if config_file.exists():
        config_file.unlink()
    names = sorted(entry.name for entry in temporary.iterdir() if entry.name != OWNER_MARKER)
    for name in [name for name in names if name != "config.json"] + ["config.json"]:
        source, target = temporary / name, output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(source, target)
    shutil.rmtree(temporary, ignore_errors=True)
    logger.info(f"Saved the final model to {output_dir}")


if __name__ == "__main__":
    sys.exit(main())
