"""CLIP-RC model configuration."""

import copy
import inspect
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from string import Formatter

from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

SETTINGS = ("inductive", "transductive", "fully")

# The defaults are the reference's PASCAL VOC recipe: its 20 classes, the last 5 unseen (SPEC §5).
VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_SEEN_CLASS_IDS = tuple(range(15))

# The reference subtracts 0.1 from the scores of the classes its head was trained on, except in the
# transductive stage, which trains on every class and calibrates nothing.
_SEEN_SCORE_BIAS = {"inductive": 0.1, "transductive": 0.0, "fully": 0.1}

# The pipelines every saved folder declares; their module (`pipelines.py`) is saved beside the weights, so that
# `pipeline(task, model=folder, trust_remote_code=True)` serves them in a process that never imported `clip_rc`.
CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipelines.CLIPRCSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    },
    "zero-shot-image-segmentation": {
        "impl": "pipelines.CLIPRCZeroShotSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "multimodal",
    },
}

# OpenAI's ViT-B/16 image tower, the backbone of every reference recipe.
_VIT_B_16 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "image_size": 224,
    "projection_dim": 512,
}

# Sizes of the CLIP towers that must be positive integers (checked before the tower configs divide by them).
_TOWER_SIZES = {
    "vision_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "image_size",
        "num_channels",
    ),
    "text_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ),
}
# Fields of this config with the smallest value they may take (other range rules live in `_validate`).
_MINIMUM_VALUES = {
    "projection_dim": 1,
    "crop_size": 1,
    "num_prompt_tokens": 1,
    "decoder_hidden_size": 1,
    "decoder_num_attention_heads": 1,
    "decoder_num_layers": 1,
    "decoder_intermediate_size": 1,
    "recovery_num_layers": 0,
    "focal_gamma": 0.0,
    "mask_loss_weight": 0.0,
    "dice_loss_weight": 0.0,
    "recovery_loss_weight": 0.0,
}
_PROBABILITIES = ("prompt_dropout", "decoder_dropout", "decoder_attention_dropout", "focal_alpha")


def _matches_annotation(value, annotation) -> bool:
    """`isinstance` for the annotations of the config fields, with JSON's number rules: an integer (Python or NumPy) is
    a valid float, a bool is not a number, and a tuple is a valid list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_annotation(value, option) for option in typing.get_args(annotation))
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_matches_annotation(item, item_type) for item in value)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _check_tower_sizes(name: str, tower) -> None:
    """Positive integer sizes of a CLIP tower config (a dict or a config object), errors naming field and value."""
    values = tower if isinstance(tower, Mapping) else vars(tower)
    for key in _TOWER_SIZES[name]:
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}.{key}` must be a positive integer, got {value!r}.")


class CLIPRCConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CLIPRCForSemanticSegmentation`]: a CLIP model (vision and text towers) extended with deep
    visual prompts, a Region-Level Bridge of region tokens and a region-alignment decoder (Zhang et al., "Exploring
    Regional Clues in CLIP for Zero-Shot Semantic Segmentation", CVPR 2024).

    The defaults reproduce the reference's PASCAL VOC inductive recipe on CLIP ViT-B/16; the six reference recipes
    are available through [`CLIPRCConfig.from_preset`].

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP image tower. Defaults to ViT-B/16.
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower. Defaults to CLIP's 12-layer, 512-wide text transformer.
        projection_dim (`int`, *optional*, defaults to 512):
            Width E of CLIP's joint image-text embedding space.
        crop_size (`int`, *optional*, defaults to 512):
            Side of the square training crop and of the sliding inference window; sets the position table
            (1 + (crop_size / patch_size)² rows) and the region-token attention mask.
        sliding_window_stride (`int`, *optional*, defaults to 426):
            Stride of the sliding inference windows.
        num_prompt_tokens (`int`, *optional*, defaults to 10):
            Number P of visual prompt tokens inserted after the class token in every layer.
        region_grid_size (`int`, *optional*, defaults to 4):
            The patch grid is cut into `region_grid_size`² cells, one region token each.
        train_region_tokens (`bool`, *optional*, defaults to `False`):
            The reference keeps the region tokens frozen at their CLIP initialisation; `True` trains them.
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Width of the region-alignment decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 8):
            Heads of every decoder cross-attention.
        decoder_num_layers (`int`, *optional*, defaults to 3):
            Number of (query, pixel) cross-attention layer pairs.
        decoder_intermediate_size (`int`, *optional*, defaults to 2048):
            Width of the decoder feed-forward layers.
        recovery_num_layers (`int`, *optional*, defaults to 1):
            Number of layer pairs of the recovery decoder used by the recovery loss.
        prompt_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the projected prompt tokens.
        decoder_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the decoder residual branches and inside its feed-forward layers.
        decoder_attention_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the decoder attention probabilities.
        focal_alpha (`float`, *optional*, defaults to 0.25), focal_gamma (`float`, *optional*, defaults to 2.0):
            Parameters of the sigmoid focal loss.
        mask_loss_weight (`float`, *optional*, defaults to 100.0), dice_loss_weight (`float`, *optional*, defaults to 1.0),
        recovery_loss_weight (`float`, *optional*, defaults to 2.0):
            Weights of the focal, dice and (each of the two) recovery L1 losses.
        setting (`str`, *optional*, defaults to `"inductive"`):
            `"inductive"` trains on seen-class pixels and seen-class text only; `"transductive"` feeds every class to
            the head and pseudo-labels unseen pixels; `"fully"` trains on every class.
        seen_class_ids (`list[int]`, *optional*):
            The zero-shot split: ids (into `id2label`) of the seen classes. `None` means every class is seen.
        seen_score_bias (`float`, *optional*):
            Subtracted from the sigmoid scores of the classes the head was trained on. Defaults to the reference's
            value for `setting` (0.1 inductive and fully, 0.0 transductive).
        prompt_templates (`list[str]`, *optional*):
            Text templates, each with one `{}` for the class name; class embeddings average over them.
        benchmark (`str`, *optional*):
            Name of the benchmark the class list comes from (informational; used by the scripts).
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that carry no class.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of the decoder.
    """

    model_type = "clip_rc"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "text_config": CLIPTextConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | CLIPTextConfig | None = None
    projection_dim: int = 512
    crop_size: int = 512
    sliding_window_stride: int = 426
    num_prompt_tokens: int = 10
    region_grid_size: int = 4
    train_region_tokens: bool = False
    decoder_hidden_size: int = 512
    decoder_num_attention_heads: int = 8
    decoder_num_layers: int = 3
    decoder_intermediate_size: int = 2048
    recovery_num_layers: int = 1
    prompt_dropout: float = 0.1
    decoder_dropout: float = 0.1
    decoder_attention_dropout: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_loss_weight: float = 100.0
    dice_loss_weight: float = 1.0
    recovery_loss_weight: float = 2.0
    setting: str = "inductive"
    seen_class_ids: list[int] | None = None
    seen_score_bias: float | None = None
    prompt_templates: list[str] | None = None
    benchmark: str | None = None
    ignore_index: int = 255
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = CLIPVisionConfig(**_VIT_B_16)
        # Before the tower configs are built: they divide by some of these sizes.
        for name in _TOWER_SIZES:
            if isinstance(getattr(self, name), Mapping):
                _check_tower_sizes(name, getattr(self, name))
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(VOC_CLASS_NAMES))
            self.benchmark = self.benchmark or "voc"
            if self.seen_class_ids is None:
                self.seen_class_ids = list(VOC_SEEN_CLASS_IDS)
        if self.prompt_templates is None:
            self.prompt_templates = ["a photo of a {}"]
        elif isinstance(self.prompt_templates, str):
            self.prompt_templates = [self.prompt_templates]
        elif isinstance(self.prompt_templates, tuple):
            self.prompt_templates = list(self.prompt_templates)
        if self.seen_score_bias is None and self.setting in SETTINGS:
            self.seen_score_bias = _SEEN_SCORE_BIAS[self.setting]
        super().__post_init__(**kwargs)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {name: index for index, name in self.id2label.items()}
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        if self.seen_class_ids is not None and _matches_annotation(self.seen_class_ids, list[int]):
            self.seen_class_ids = [int(class_id) for class_id in self.seen_class_ids]
        self._validate()

    def _validate(self):
        self._check_field_types_and_ranges()
        check_class_names(self.class_names, field="id2label")
        if self.setting not in SETTINGS:
            raise ValueError(f"`setting` must be one of {SETTINGS}, got {self.setting!r}.")
        for name in _TOWER_SIZES:
            _check_tower_sizes(name, getattr(self, name))
        self._check_grid()
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"`decoder_hidden_size` ({self.decoder_hidden_size}) must be a multiple of "
                f"`decoder_num_attention_heads` ({self.decoder_num_attention_heads})."
            )
        check_templates(self.prompt_templates, field="prompt_templates")
        self._check_split()

    def _check_field_types_and_ranges(self):
        """Every field of this config holds a value of its annotated type, in range; errors name field and value."""
        hints = inspect.get_annotations(CLIPRCConfig, eval_str=True)
        for name in hints:
            value = getattr(self, name)
            if not _matches_annotation(value, hints[name]):
                annotation = getattr(hints[name], "__name__", None) or str(hints[name])
                raise ValueError(f"`{name}` must be of type {annotation}, got {value!r}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        for name, minimum in _MINIMUM_VALUES.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"`{name}` must be at least {minimum}, got {getattr(self, name)!r}.")
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)!r}.")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"`id2label` must be keyed 0 .. num_labels - 1, got keys {sorted(self.id2label)[:10]}.")
        if 0 <= self.ignore_index < self.num_labels:
            raise ValueError(
                f"`ignore_index` ({self.ignore_index}) must not be a class id (0 .. {self.num_labels - 1})."
            )

    def _check_grid(self):
        """Crop, patch grid, region grid and sliding windows fit together."""
        patch_size = self.vision_config.patch_size
        if self.crop_size % patch_size != 0:
            raise ValueError(
                f"`crop_size` ({self.crop_size}) must be a multiple of the vision patch size ({patch_size})."
            )
        patch_grid = self.crop_size // patch_size
        if self.region_grid_size < 1 or patch_grid % self.region_grid_size != 0:
            divisors = [size for size in range(1, patch_grid + 1) if patch_grid % size == 0]
            raise ValueError(
                f"`region_grid_size` ({self.region_grid_size}) must divide the patch grid of {patch_grid}x{patch_grid}"
                f" (crop_size {self.crop_size} / patch_size {patch_size}); allowed values: {divisors}."
            )
        if not 0 < self.sliding_window_stride <= self.crop_size:
            raise ValueError(
                f"`sliding_window_stride` must be in [1, crop_size={self.crop_size}], got {self.sliding_window_stride}."
            )

    def _check_split(self):
        """The zero-shot split names existing classes, and the setting can use it."""
        if self.seen_class_ids is not None:
            out_of_range = [i for i in self.seen_class_ids if not 0 <= i < self.num_labels]
            if out_of_range:
                raise ValueError(
                    f"`seen_class_ids` must lie in [0, {self.num_labels - 1}] (num_labels={self.num_labels}); "
                    f"out of range: {out_of_range}."
                )
            duplicated = sorted({i for i in self.seen_class_ids if self.seen_class_ids.count(i) > 1})
            if duplicated:
                raise ValueError(f"`seen_class_ids` must not repeat ids; repeated: {duplicated}.")
            if not self.seen_class_ids:
                raise ValueError("`seen_class_ids` must name at least one class (or be None: every class seen).")
        if self.setting == "transductive" and not self.unseen_class_ids:
            raise ValueError(
                "`setting='transductive'` pseudo-labels unseen classes, but `seen_class_ids` covers every class; "
                "give a zero-shot split or use setting 'fully'."
            )

    @property
    def resolved_seen_class_ids(self) -> list[int]:
        """Seen class ids, every class when `seen_class_ids` is None."""
        if self.seen_class_ids is None:
            return list(range(self.num_labels))
        return sorted(self.seen_class_ids)

    @property
    def unseen_class_ids(self) -> list[int]:
        seen = set(self.resolved_seen_class_ids)
        return [i for i in range(self.num_labels) if i not in seen]

    @property
    def trained_class_ids(self) -> list[int]:
        """Classes whose masks supervise the head: the seen ones, or all of them in the fully supervised setting.
        Their inference scores are lowered by `seen_score_bias`."""
        if self.setting == "fully":
            return list(range(self.num_labels))
        return self.resolved_seen_class_ids

    @property
    def class_names(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    @property
    def num_region_tokens(self) -> int:
        return self.region_grid_size**2

    @property
    def patch_grid_size(self) -> int:
        return self.crop_size // self.vision_config.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CLIPRCConfig":
        """
        The configuration of one of the reference's six recipes, full size (CLIP ViT-B/16): `voc-inductive`,
        `voc-transductive`, `voc-fully`, `coco-stuff-inductive`, `coco-stuff-transductive`, `coco-stuff-fully`.
        Keyword arguments override any field (e.g. smaller towers for tests).
        """
        # The recipes live in the clip-rc package, not in checkpoint folders (a folder loads without them).
        try:
            from clip_rc.presets import preset_values
        except ImportError as error:
            raise ImportError(f"Preset {name!r} needs the clip-rc package: `pip install clip-rc`.") from error
        return cls(**{**preset_values(name), **overrides})


def _template_problem(template) -> str | None:
    """Why `template` is not a prompt template with exactly one `{}` slot and no other replacement field, or None."""
    if not isinstance(template, str):
        return f"is of type {type(template).__name__}, not a string"
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as error:  # an unmatched brace
        return f"is not a valid format string ({error}; write a literal brace as '{{{{' or '}}}}')"
    fields = [(name, conversion, spec) for _, name, spec, conversion in parsed if name is not None]
    slots = [field for field in fields if field == ("", None, "")]
    others = [
        "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        for name, conversion, spec in fields
        if (name, conversion, spec) != ("", None, "")
    ]
    if others:
        return f"has replacement field(s) {', '.join(others)}; only one '{{}}' for the class name is allowed"
    if len(slots) != 1:
        return f"has {len(slots)} '{{}}' slots; it needs exactly one, for the class name"
    return None


def check_templates(templates: str | Sequence[str], field: str = "templates") -> tuple[str, ...]:
    """
    The prompt templates as a tuple. Raises a `ValueError` naming `field` and the template unless there is at least
    one template and each holds exactly one `{}` slot for the class name and no other replacement field (`"a photo"`,
    `"a {} and {}"` and `"a {} of {kind}"` are refused; a literal brace is written `{{` / `}}`).
    """
    if templates is None or (not isinstance(templates, str) and not isinstance(templates, Sequence)):
        raise ValueError(f"`{field}` must be a template string or a list of them, got {templates!r}.")
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise ValueError(f"`{field}` needs at least one prompt template with one '{{}}' slot for the class name.")
    for template in templates:
        problem = _template_problem(template)
        if problem is not None:
            raise ValueError(f"`{field}`: the template {template!r} {problem}.")
    return templates


def check_class_names(class_names: Sequence[str], field: str = "class names") -> tuple[str, ...]:
    """
    The class names as a tuple. Raises a `ValueError` naming `field` and the offending names unless there is at least
    one name and every name is a non-blank string that no other class uses (a repeated name would give two classes
    one `label2id` entry).
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(f"`{field}` must be a list of class names, got {class_names!r}.")
    class_names = tuple(class_names)
    if not class_names:
        raise ValueError(f"`{field}` must name at least one class.")
    not_strings = [name for name in class_names if not isinstance(name, str)]
    if not_strings:
        raise ValueError(f"`{field}` must hold strings; got {not_strings[:10]}.")
    blank = [index for index, name in enumerate(class_names) if not name.strip()]
    if blank:
        raise ValueError(f"`{field}`: the class(es) at position(s) {blank[:10]} have an empty name.")
    repeated = sorted({name for name in class_names if class_names.count(name) > 1})
    if repeated:
        raise ValueError(f"`{field}` must not repeat a class name; repeated: {repeated[:10]}.")
    return class_names


def parse_class_names(text: str, field: str = "--class_names") -> tuple[str, ...]:
    """Comma-separated class names in label-id order (spaces around each name are dropped), checked."""
    return check_class_names([name.strip() for name in text.split(",")], field=field)


__all__ = ["CLIPRCConfig", "SETTINGS", "VOC_CLASS_NAMES", "check_class_names", "check_templates", "parse_class_names"]
