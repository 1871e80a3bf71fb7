"""The reference's six recipes (SPEC §4-§6) in one table: what a preset sets in the model's configuration and in the
training script.

`CLIPRCConfig.from_preset("voc-inductive")` is the configuration of a recipe at full size (CLIP ViT-B/16); the training script
takes iterations, batch size and the optimiser schedule from the same [`Recipe`].
"""

from dataclasses import dataclass

from .class_sets import get_benchmark


__all__ = [
    "BASE_LEARNING_RATE",
    "LEARNING_RATE_MULTIPLIER",
    "PRESETS",
    "RECIPES",
    "Recipe",
    "WARMUP_ITERATIONS",
    "WEIGHT_DECAY",
    "preset_values",
    "train_scale",
    "window_stride",
]


@dataclass(frozen=True)
class Recipe:
    """One reference recipe: the benchmark and setting, the model's prompt count and loss weights (mask, dice,
    recovery), and the schedule's length and images per iteration (summed over the reference's 2 GPUs)."""

    benchmark: str
    setting: str
    num_prompt_tokens: int
    loss_weights: tuple[float, float, float]
    max_steps: int
    total_train_batch_size: int


RECIPES = {
    "voc-inductive": Recipe("voc", "inductive", 10, (100.0, 1.0, 2.0), 40_000, 16),
    "voc-transductive": Recipe("voc", "transductive", 10, (100.0, 1.0, 2.0), 20_000, 16),
    "voc-fully": Recipe("voc", "fully", 10, (100.0, 1.0, 0.0), 40_000, 16),
    "coco-stuff-inductive": Recipe("coco-stuff", "inductive", 100, (200.0, 3.0, 50.0), 80_000, 4),
    "coco-stuff-transductive": Recipe("coco-stuff", "transductive", 100, (200.0, 3.0, 50.0), 40_000, 4),
    "coco-stuff-fully": Recipe("coco-stuff", "fully", 100, (100.0, 1.5, 1.0), 80_000, 4),
}
PRESETS = tuple(RECIPES)

# The optimiser of every recipe (SPEC §6): AdamW at the base rate, x10 on the backbone and head custom keys, decay
# 0.01, poly decay after a linear warm-up of 1500 iterations.
BASE_LEARNING_RATE = 2e-5
LEARNING_RATE_MULTIPLIER = 10.0
WEIGHT_DECAY = 0.01
WARMUP_ITERATIONS = 1500

# The reference's geometry at its 512 crop: test windows every 426 pixels, training rescale of img_scale (2048, 512).
_REFERENCE_CROP = 512
_REFERENCE_WINDOW_STRIDE = 426
_REFERENCE_TRAIN_SCALE = (2048, 512)


def window_stride(crop_size: int) -> int:
    """The reference's sliding-window stride scaled to `crop_size` (426 at 512)."""
    return max(1, int(crop_size * _REFERENCE_WINDOW_STRIDE / _REFERENCE_CROP))


def train_scale(crop_size: int) -> tuple[int, int]:
    """The reference's training rescale `img_scale` (long, short) scaled to `crop_size` ((2048, 512) at 512)."""
    return tuple(side * crop_size // _REFERENCE_CROP for side in _REFERENCE_TRAIN_SCALE)


def preset_values(name: str) -> dict:
    """
    The configuration fields one of the reference's six recipes sets (`voc-inductive`, `voc-transductive`,
    `voc-fully`, `coco-stuff-inductive`, `coco-stuff-transductive`, `coco-stuff-fully`): classes, zero-shot split,
    setting, prompt count, loss weights and templates. [`CLIPRCConfig.from_preset`] builds the configuration.
    """
    recipe = RECIPES.get(name)
    if recipe is None:
        raise ValueError(f"Unknown preset {name!r}; allowed presets: {', '.join(PRESETS)}.")
    benchmark = get_benchmark(recipe.benchmark)
    mask_weight, dice_weight, recovery_weight = recipe.loss_weights
    return {
        "id2label": dict(enumerate(benchmark.class_names)),
        # Fully supervised models still report seen / unseen figures on the benchmark's zero-shot split.
        "seen_class_ids": list(benchmark.seen_class_ids),
        "setting": recipe.setting,
        "benchmark": benchmark.name,
        "num_prompt_tokens": recipe.num_prompt_tokens,
        "mask_loss_weight": mask_weight,
        "dice_loss_weight": dice_weight,
        "recovery_loss_weight": recovery_weight,
        "prompt_templates": list(benchmark.templates),
    }
