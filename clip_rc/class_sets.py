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
"""Benchmark definitions used by CLIP-RC: class names, zero-shot splits, prompt templates and palettes.

Every benchmark lists its classes in train-id order, i.e. the order of the ids stored in the label maps
that [`clip_rc.data.load_segmentation_dataset`] returns (255 is the ignore index everywhere).

- `"voc"`: PASCAL VOC 2012 without background (20 classes, the reference's `ZeroPascalVOCDataset20`).
  Unseen classes 15..19 (pottedplant, sheep, sofa, train, tvmonitor). One prompt template,
  [`VOC_TEMPLATES`]. Palette: mmsegmentation's VOC palette without the background colour.
- `"coco-stuff"`: COCO-Stuff 164k, 171 classes spelled as mmsegmentation's `COCOStuffDataset.CLASSES`.
  Unseen ids 19 23 28 29 36 51 76 88 94 112 133 136 137 157 160 (the reference's `unseen_idx`).
  The 15 templates of [`COCO_STUFF_TEMPLATES`]. Palette: mmsegmentation's `COCOStuffDataset.PALETTE`
  (the reference copy changes two of its colours; mmsegmentation's is kept here).
- `"pascal-context-59"` / `"pascal-context-60"`: PASCAL Context as mmsegmentation's `PascalContextDataset59`
  (background dropped) and `PascalContextDataset` (background is class 0). The reference only scores
  Context cross-dataset with a model trained on COCO-Stuff, so it uses [`COCO_STUFF_TEMPLATES`] for its prompts.
  Neither the reference nor ZegCLIP documents a seen/unseen split for Context, so `unseen_class_ids` is
  empty: every class counts as seen, and "unseen" metrics are not defined for these benchmarks.
- `"ade20k-150"`: ADE20K / SceneParse150 (`ADEChallengeData2016`), the 150 classes of mmsegmentation's
  `ADE20KDataset` in train-id order (stored label 0 is "other objects" and is dropped: stored `k` is train id
  `k - 1`) and its palette (which repeats one colour, kept as is). mmsegmentation spells class 7 `"bed "` with a
  trailing space; it is `"bed"` here, as every other name has no surrounding space. Like Context it is scored
  cross-dataset with a COCO-Stuff model, so its prompts use [`COCO_STUFF_TEMPLATES`]; neither the reference,
  ZegCLIP nor mmsegmentation publishes a seen / unseen split of ADE20K-150, so `unseen_class_ids` is empty.

Your own classes come from the command line, a class-names file or a dataset's `id2label.json`: [`ClassList`]
holds such a list with its zero-shot split, [`class_list`] builds and checks one, [`parse_class_ids`] reads a
split given by names or ids.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

from .configuration_clip_rc import VOC_CLASS_NAMES, check_class_names, check_templates, parse_class_names


__all__ = [
    "Benchmark",
    "BENCHMARKS",
    "COCO_STUFF_TEMPLATES",
    "ClassList",
    "VOC_TEMPLATES",
    "benchmark_of_class_names",
    "class_list",
    "class_names_from_arguments",
    "class_names_from_id2label",
    "get_benchmark",
    "parse_class_ids",
    "read_class_names_file",
]


@dataclass(frozen=True)
class Benchmark:
    """
    A semantic segmentation benchmark as CLIP-RC trains and scores it.

    Args:
        name (`str`):
            Short identifier, the key of [`BENCHMARKS`] (e.g. `"voc"`).
        class_names (`tuple[str, ...]`):
            Class names in train-id order: label id `k` in a label map means `class_names[k]`.
        unseen_class_ids (`tuple[int, ...]`):
            Ids of the classes held out in the zero-shot (inductive / transductive) setting; `()` if the
            benchmark has no zero-shot split.
        templates (`tuple[str, ...]`):
            Prompt templates with one `"{}"` slot for the class name. The text embedding of a class is
            the renormalised mean of the normalised embeddings of its prompts.
        palette (`tuple[tuple[int, int, int], ...]`):
            One RGB colour per class, for visualisation.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that are not scored and carry no training signal.
    """

    name: str
    class_names: tuple[str, ...]
    unseen_class_ids: tuple[int, ...]
    templates: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255

    def __post_init__(self):
        num_classes = len(check_class_names(self.class_names, field=f"class names of benchmark {self.name!r}"))
        if len(self.palette) != num_classes:
            raise ValueError(
                f"Benchmark {self.name!r} has {len(self.palette)} palette colours for {num_classes} classes."
            )
        if any(not 0 <= class_id < num_classes for class_id in self.unseen_class_ids):
            raise ValueError(f"Benchmark {self.name!r} has unseen class ids outside [0, {num_classes}).")
        if len(set(self.unseen_class_ids)) != len(self.unseen_class_ids):
            raise ValueError(f"Benchmark {self.name!r} has duplicate unseen class ids.")
        check_templates(self.templates, field=f"templates of benchmark {self.name!r}")
        if 0 <= self.ignore_index < num_classes:
            raise ValueError(f"Benchmark {self.name!r} has an ignore index that is also a class id.")

    @property
    def num_classes(self) -> int:
        """Number of classes (the label ids are `0 .. num_classes - 1`)."""
        return len(self.class_names)

    @property
    def seen_class_ids(self) -> tuple[int, ...]:
        """Ids of the classes seen in training in the zero-shot setting, ascending."""
        unseen = set(self.unseen_class_ids)
        return tuple(class_id for class_id in range(self.num_classes) if class_id not in unseen)

    @property
    def seen_class_names(self) -> tuple[str, ...]:
        """Names of the seen classes, in the order of [`Benchmark.seen_class_ids`]."""
        return tuple(self.class_names[class_id] for class_id in self.seen_class_ids)

    @property
    def unseen_class_names(self) -> tuple[str, ...]:
        """Names of the unseen classes, in the order of [`Benchmark.unseen_class_ids`]."""
        return tuple(self.class_names[class_id] for class_id in self.unseen_class_ids)

    @property
    def id2label(self) -> dict[int, str]:
        """Mapping from label id to class name, as `PretrainedConfig.id2label` expects."""
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        """Mapping from class name to label id, as `PretrainedConfig.label2id` expects."""
        return {name: class_id for class_id, name in enumerate(self.class_names)}

    def prompts(self, class_name: str) -> list[str]:
        """The prompts of one class: every template filled with `class_name`."""
        return [template.format(class_name) for template in self.templates]


VOC_TEMPLATES = ("a photo of a {}",)

COCO_STUFF_TEMPLATES = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)


# mmsegmentation's VOC colours without the background one (black).
VOC_PALETTE = (
    (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128), (128, 128, 128),
    (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128), (64, 128, 128),
    (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
)  # fmt: skip

COCO_STUFF_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

COCO_STUFF_UNSEEN_CLASS_IDS = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)

# mmsegmentation's COCOStuffDataset.PALETTE (it repeats a few colours; kept as is).
COCO_STUFF_PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224), (0, 192, 192),
    (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224), (0, 0, 64), (0, 160, 192),
    (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224), (0, 0, 192), (128, 160, 192), (128, 128, 0),
    (128, 0, 32), (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160),
    (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128),
    (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192), (0, 128, 32),
    (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192), (0, 128, 160), (192, 224, 0),
    (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192), (0, 0, 32), (64, 160, 128), (128, 64, 64),
    (128, 0, 160), (64, 32, 128), (128, 192, 192), (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96),
    (192, 32, 0), (128, 64, 128), (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0),
    (0, 192, 128), (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128), (64, 0, 224),
    (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192), (0, 128, 96), (0, 224, 0),
    (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0), (64, 192, 64),
    (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224),
    (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64),
    (192, 0, 128), (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128), (64, 64, 32),
    (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128), (64, 64, 160), (128, 224, 192),
    (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192), (0, 192, 32), (64, 224, 64), (64, 0, 64),
    (128, 192, 160), (64, 96, 64), (64, 128, 192), (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32),
    (192, 32, 192), (64, 64, 192), (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192),
    (192, 192, 192), (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
)  # fmt: skip

PASCAL_CONTEXT_59_CLASS_NAMES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)  # fmt: skip

# mmsegmentation's PascalContextDataset59 palette; PascalContextDataset prepends (120, 120, 120) for background.
PASCAL_CONTEXT_59_PALETTE = (
    (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140), (204, 5, 255),
    (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250),
    (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92),
    (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255),
)  # fmt: skip


# mmsegmentation's ADE20KDataset classes (its "bed " without the trailing space) and palette.
ADE20K_150_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

ADE20K_150_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip


BENCHMARKS: dict[str, Benchmark] = {
    "voc": Benchmark(
        name="voc",
        class_names=VOC_CLASS_NAMES,
        unseen_class_ids=(15, 16, 17, 18, 19),
        templates=VOC_TEMPLATES,
        palette=VOC_PALETTE,
    ),
    "coco-stuff": Benchmark(
        name="coco-stuff",
        class_names=COCO_STUFF_CLASS_NAMES,
        unseen_class_ids=COCO_STUFF_UNSEEN_CLASS_IDS,
        templates=COCO_STUFF_TEMPLATES,
        palette=COCO_STUFF_PALETTE,
    ),
    "pascal-context-59": Benchmark(
        name="pascal-context-59",
        class_names=PASCAL_CONTEXT_59_CLASS_NAMES,
        unseen_class_ids=(),
        templates=COCO_STUFF_TEMPLATES,
        palette=PASCAL_CONTEXT_59_PALETTE,
    ),
    "pascal-context-60": Benchmark(
        name="pascal-context-60",
        class_names=("background",) + PASCAL_CONTEXT_59_CLASS_NAMES,
        unseen_class_ids=(),
        templates=COCO_STUFF_TEMPLATES,
        palette=((120, 120, 120),) + PASCAL_CONTEXT_59_PALETTE,
    ),
    "ade20k-150": Benchmark(
        name="ade20k-150",
        class_names=ADE20K_150_CLASS_NAMES,
        unseen_class_ids=(),
        templates=COCO_STUFF_TEMPLATES,
        palette=ADE20K_150_PALETTE,
    ),
}


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """
    Look up a benchmark by name.

    Args:
        name (`str` or [`Benchmark`]):
            One of the keys of [`BENCHMARKS`]; a [`Benchmark`] is returned unchanged.

    Returns:
        [`Benchmark`]: The benchmark definition.

    Raises:
        `ValueError`: If `name` is not a known benchmark; the message lists the allowed names.
    """
    if isinstance(name, Benchmark):
        return name
    if name not in BENCHMARKS:
        allowed = ", ".join(repr(key) for key in BENCHMARKS)
        raise ValueError(f"Unknown benchmark {name!r}; expected one of {allowed}.")
    return BENCHMARKS[name]


def benchmark_of_class_names(class_names: Sequence[str]) -> Benchmark | None:
    """The known benchmark whose class list is exactly `class_names` (same names, same order), or `None`."""
    names = tuple(class_names)
    return next((benchmark for benchmark in BENCHMARKS.values() if benchmark.class_names == names), None)


def read_class_names_file(path: str | Path) -> tuple[str, ...]:
    """
    The class names of a UTF-8 text file, one a line: line `k + 1` names label id `k`. Spaces around a name and blank
    lines at the end are dropped; any other blank line, bytes that are not UTF-8, or a repeated name are errors naming
    the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing class names file {path}.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"The class names file {path} is not valid UTF-8 ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from error
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    blank = [number for number, name in enumerate(names, start=1) if not name]
    if blank:
        raise ValueError(
            f"Line(s) {blank[:10]} of the class names file {path} are blank: write one class name a line (line k + 1 "
            "names label id k)."
        )
    return check_class_names(names, field=f"class names file {path}")


def class_names_from_id2label(id2label: Mapping, source: str) -> tuple[str, ...]:
    """
    The class names of an `id2label` mapping (as `id2label.json` stores it: keys are the label ids 0 .. N-1, as
    integers or decimal strings; values the names), in id order. Errors name `source`.
    """
    if not isinstance(id2label, Mapping) or not id2label:
        raise ValueError(
            f"{source} must be a non-empty JSON object mapping label ids to class names, got {id2label!r}."
        )
    names_by_id = {}
    for key, name in id2label.items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit():
            raise ValueError(f"{source}: the key {key!r} is not a label id (a non-negative integer).")
        if int(text) in names_by_id:
            raise ValueError(f"{source} names label id {int(text)} twice.")
        names_by_id[int(text)] = name
    missing = sorted(set(range(len(names_by_id))) - set(names_by_id))
    if missing:
        raise ValueError(
            f"{source} must number its {len(names_by_id)} classes 0 .. {len(names_by_id) - 1}; ids {missing[:10]} are "
            f"missing (it has {sorted(names_by_id)[:10]}{' ...' if len(names_by_id) > 10 else ''})."
        )
    return check_class_names([names_by_id[class_id] for class_id in range(len(names_by_id))], field=source)


def class_names_from_arguments(
    class_names: str | None, class_names_file: str | None
) -> tuple[tuple[str, ...], str] | None:
    """The class names given by `--class_names` (comma-separated) or `--class_names_file` (one a line) with a
    description of where they come from, or `None` when neither is given; both at once is an error."""
    if class_names is not None and class_names_file is not None:
        raise ValueError("Give the classes with --class_names or with --class_names_file, not both.")
    if class_names is not None:
        return parse_class_names(class_names), "--class_names"
    if class_names_file is not None:
        return read_class_names_file(class_names_file), f"--class_names_file {class_names_file}"
    return None


def parse_class_ids(
    classes: str | Sequence[str | int], class_names: Sequence[str], field: str = "--unseen_classes"
) -> tuple[int, ...]:
    """
    Label ids of classes given by name or id (a comma-separated string or a list), ascending. A token is read as a
    class name first, then as an integer id. Unknown names (with the closest known names), ids outside the class
    list, empty tokens and repeated classes are errors naming `field`.
    """
    tokens = classes.split(",") if isinstance(classes, str) else list(classes)
    label2id = {name: class_id for class_id, name in enumerate(class_names)}
    ids = []
    for token in tokens:
        text = str(token).strip()
        if not text:
            raise ValueError(
                f"`{field}` holds an empty entry ({classes!r}); give class names or ids, comma-separated."
            )
        if text in label2id:
            ids.append(label2id[text])
        elif text.lstrip("-").isdigit():
            if not 0 <= int(text) < len(class_names):
                raise ValueError(
                    f"`{field}`: class id {int(text)} is outside the {len(class_names)} classes (ids 0 .. "
                    f"{len(class_names) - 1})."
                )
            ids.append(int(text))
        else:
            close = get_close_matches(text, list(label2id), n=3)
            hint = f" Did you mean {', '.join(repr(name) for name in close)}?" if close else ""
            raise ValueError(f"`{field}`: {text!r} is not one of the {len(class_names)} class names.{hint}")
    repeated = sorted({class_names[i] for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"`{field}` names a class more than once: {repeated[:10]}.")
    return tuple(sorted(ids))


@dataclass(frozen=True)
class ClassList:
    """
    The classes of a dataset, as a model is trained on or scored with them.

    Args:
        names (`tuple[str, ...]`): class names in label-id order.
        unseen_class_ids (`tuple[int, ...]`): the zero-shot split (ascending); `()` when every class is seen.
        source (`str`): where the list comes from (a flag, a file, a benchmark), for messages.
        benchmark (`str`, *optional*): the known benchmark with exactly these classes, `None` for your own.
    """

    names: tuple[str, ...]
    unseen_class_ids: tuple[int, ...]
    source: str
    benchmark: str | None = None

    @property
    def seen_class_ids(self) -> tuple[int, ...]:
        unseen = set(self.unseen_class_ids)
        return tuple(class_id for class_id in range(len(self.names)) if class_id not in unseen)

    @property
    def benchmark_name(self) -> str:
        """The benchmark name as saved in a model config: the benchmark's, or `"custom"` for your own classes."""
        return self.benchmark or "custom"


def class_list(
    names: Sequence[str],
    source: str,
    unseen_classes: str | Sequence[str | int] | None = None,
    default_unseen_class_ids: Sequence[int] | None = None,
) -> ClassList:
    """
    A checked [`ClassList`]. Its zero-shot split is `unseen_classes` (names or ids, see [`parse_class_ids`]) when
    given, else `default_unseen_class_ids`, else the split of the benchmark with exactly these classes, else none.
    At least one class must stay seen.
    """
    names = check_class_names(names, field=source)
    benchmark = benchmark_of_class_names(names)
    if unseen_classes is not None:
        unseen = parse_class_ids(unseen_classes, names)
    elif default_unseen_class_ids is not None:
        unseen = tuple(sorted(int(class_id) for class_id in default_unseen_class_ids))
    else:
        unseen = benchmark.unseen_class_ids if benchmark is not None else ()
    if len(unseen) == len(names):
        raise ValueError(f"`--unseen_classes` names all {len(names)} classes of {source}; at least one must be seen.")
    return ClassList(names, tuple(unseen), source, benchmark.name if benchmark is not None else None)
