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
"""A small synthetic world for testing zero-shot segmentation offline: shapes with names, label maps and captions.

The world
---------
Twelve classes ([`SYNTHETIC_CLASSES`]), each a fixed combination of a shape (circle, ellipse, triangle, square, star,
ring, cross, crescent), a hue (red, orange, yellow, green, cyan, blue, purple, magenta) and a texture (solid, stripes,
dots, checker). Every pair of classes differs in at least two of the three, textures and most colours are shared by
several classes, and each unseen class (melon, donut, tile) shares its shape, its colour and its texture with seen
classes, so no unseen class can be told by one novel attribute: it is a new combination. The class names are
ordinary one-word nouns ("cherry", "frog", ...) that say nothing about how the class looks: a text encoder can
only relate a name to its appearance by having seen captions that use it.

A scene ([`SyntheticWorld.sample_scene`]) is a low-saturation background (a smooth colour field with a gradient,
soft blobs and up to two grey distractor shapes) with 1..4 objects drawn on top of each other, each with a random
size, position (objects may leave the frame), rotation, aspect jitter, colour jitter and texture phase; later
objects occlude earlier ones. Rendering ([`SyntheticWorld.render`]) rasterises each object's mask once and uses it
both to paint the pixels and to write the label map, so the label map is exact: label `k` where an object of class
`k` is the top-most thing drawn, 255 (ignore) on the background and the distractors (the convention of PASCAL VOC
without background). Object pixels are saturated colours, background pixels are not (see
[`OBJECT_MIN_SATURATION`] / [`BACKGROUND_MAX_SATURATION`]), which the tests use to check the label maps against
the drawn pixels. Stripes and checks are a dark shade of the object's colour, dots a pale one. Mild Gaussian pixel
noise is added last.

Every scene comes with a caption naming the classes that are visible (at least `min_caption_pixels` pixels) in
varied phrasing ("a photo of a frog", "a kite next to a small moon", "there is a cherry and a lemon and a tile in
the scene", ...). Captions hold lower-case words and spaces only, so a CLIP tokenizer decodes them back exactly.

The benchmark
-------------
[`synthetic_benchmark`] is the [`~clip_rc.class_sets.Benchmark`] of this world (`"synthetic-shapes"`): the twelve
class names in id order, unseen classes 9, 10, 11 (melon, donut, tile), the template `"a photo of a {}"` and a
palette. [`write_synthetic_dataset`] writes a `datasets.DatasetDict` (`train` / `validation`, columns `image`,
`label`, `caption`, `class_ids`) with `save_to_disk`, plus `benchmark.json`; it loads with
[`clip_rc.data.load_segmentation_dataset`] (which keeps `image` and `label`), and [`load_synthetic_benchmark`]
reads the benchmark back. Everything is seeded: the same arguments give the same bytes.
"""

import colorsys
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from ..class_sets import Benchmark
from ..utils import write_json_atomic


__all__ = [
    "BACKGROUND_MAX_SATURATION",
    "OBJECT_MIN_SATURATION",
    "SYNTHETIC_BENCHMARK_NAME",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_TEMPLATES",
    "SYNTHETIC_UNSEEN_CLASS_IDS",
    "Scene",
    "SceneObject",
    "SyntheticClass",
    "SyntheticWorld",
    "WorldConfig",
    "load_synthetic_benchmark",
    "pixel_saturation",
    "synthetic_benchmark",
    "write_synthetic_dataset",
]

SYNTHETIC_BENCHMARK_NAME = "synthetic-shapes"
SYNTHETIC_TEMPLATES = ("a photo of a {}",)
BENCHMARK_FILE = "benchmark.json"

HUES = {
    "red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 120.0, "cyan": 185.0, "blue": 235.0, "purple": 268.0,
    "magenta": 300.0,
}  # fmt: skip
SHAPES = ("circle", "ellipse", "triangle", "square", "star", "ring", "cross", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker")

# Object pixels (noise-free) have an HSV saturation of at least OBJECT_MIN_SATURATION, background pixels at most
# BACKGROUND_MAX_SATURATION.
OBJECT_MIN_SATURATION = 0.37
BACKGROUND_MAX_SATURATION = 0.3


def _gaussian_quantiles(count: int = 256) -> np.ndarray:
    """Standard normal quantiles at the mid-points of `count` equal probability bins (float32)."""
    from statistics import NormalDist

    normal = NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / count) for i in range(count)], dtype=np.float32)


_GAUSSIAN_QUANTILES = _gaussian_quantiles()


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(source: int, target: int) -> np.ndarray:
    """`(target, source)` weights of a bilinear resize with half-pixel centres (edges clamped)."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    weight = (position - low).astype(np.float32)
    matrix = np.zeros((target, source), dtype=np.float32)
    np.add.at(matrix, (np.arange(target), low), 1 - weight)
    np.add.at(matrix, (np.arange(target), high), weight)
    return matrix


@dataclass(frozen=True)
class SyntheticClass:
    """One class of the world: a name and the shape / hue / texture that every instance of it has."""

    name: str
    shape: str
    colour: str
    texture: str

    @property
    def hue(self) -> float:
        return HUES[self.colour]


SYNTHETIC_CLASSES = (
    SyntheticClass("cherry", "circle", "red", "solid"),
    SyntheticClass("lemon", "ellipse", "yellow", "solid"),
    SyntheticClass("frog", "triangle", "green", "dots"),
    SyntheticClass("brick", "square", "orange", "stripes"),
    SyntheticClass("tulip", "star", "magenta", "solid"),
    SyntheticClass("button", "ring", "blue", "solid"),
    SyntheticClass("kite", "triangle", "cyan", "checker"),
    SyntheticClass("moon", "crescent", "yellow", "dots"),
    SyntheticClass("clover", "cross", "purple", "solid"),
    # unseen in the zero-shot split
    SyntheticClass("melon", "circle", "green", "stripes"),
    SyntheticClass("donut", "ring", "magenta", "dots"),
    SyntheticClass("tile", "square", "blue", "checker"),
)
SYNTHETIC_UNSEEN_CLASS_IDS = (9, 10, 11)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; hue in degrees, saturation and value in [0, 1]; returns floats in [0, 255]."""
    if np.ndim(hue) == 0 and np.ndim(saturation) == 0 and np.ndim(value) == 0:
        rgb = colorsys.hsv_to_rgb((float(hue) % 360.0) / 360.0, float(saturation), float(value))
        return np.array(rgb) * 255.0
    hue, saturation, value = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (hue, saturation, value)))
    h = (hue % 360.0) / 60.0
    chroma = value * saturation
    x = chroma * (1 - np.abs(h % 2 - 1))
    zero = np.zeros_like(h)
    sector = np.floor(h).astype(int) % 6
    r = np.choose(sector, [chroma, x, zero, zero, x, chroma])
    g = np.choose(sector, [x, chroma, chroma, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, chroma, chroma, x])
    m = value - chroma
    return np.stack([r + m, g + m, b + m], axis=-1) * 255.0


def pixel_saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation `(max - min) / max` of every pixel of an `(..., 3)` RGB array (0 for black)."""
    image = np.asarray(image, dtype=np.float32)
    high, low = image.max(-1), image.min(-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)


# (saturation, value) of the palette colour by texture: a class's palette colour is its hue in its texture's shade.
_PALETTE_SV = {"solid": (0.9, 0.95), "stripes": (0.9, 0.6), "dots": (0.5, 0.95), "checker": (0.6, 0.45)}


def synthetic_benchmark() -> Benchmark:
    """The [`~clip_rc.class_sets.Benchmark`] of the synthetic world (`"synthetic-shapes"`): 12 classes, unseen
    9 / 10 / 11 (melon, donut, tile), template `"a photo of a {}"`, palette = each class's own colour."""
    palette = []
    for synthetic_class in SYNTHETIC_CLASSES:
        saturation, value = _PALETTE_SV[synthetic_class.texture]
        rgb = _hsv_to_rgb(synthetic_class.hue, saturation, value)
        palette.append(tuple(int(round(c)) for c in rgb))
    return Benchmark(
        name=SYNTHETIC_BENCHMARK_NAME,
        class_names=tuple(c.name for c in SYNTHETIC_CLASSES),
        unseen_class_ids=SYNTHETIC_UNSEEN_CLASS_IDS,
        templates=SYNTHETIC_TEMPLATES,
        palette=tuple(palette),
    )


@dataclass
class WorldConfig:
    """
    Knobs of the synthetic world. Sizes are fractions of the image side, so a world looks the same at any
    `image_size`.

    Args:
        image_size (`int`, *optional*, defaults to 96): side of the square images.
        min_objects / max_objects (`int`, *optional*, defaults to 1 / 4): objects per scene.
        min_object_size / max_object_size (`float`, *optional*, defaults to 0.2 / 0.46): object diameter.
        max_distractors (`int`, *optional*, defaults to 2): grey background shapes (labelled ignore) per scene.
        noise_std (`float`, *optional*, defaults to 4.0): standard deviation of the pixel noise on 0..255.
        texture_period (`float`, *optional*, defaults to 0.07): period of stripes / dots / checkers.
        min_caption_pixels (`float`, *optional*, defaults to 0.006): share of the image a class must cover to be
            named in the caption.
        hue_jitter (`float`, *optional*, defaults to 8.0): per-instance hue jitter in degrees.
    """

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: float = 0.2
    max_object_size: float = 0.46
    max_distractors: int = 2
    noise_std: float = 4.0
    texture_period: float = 0.07
    min_caption_pixels: float = 0.006
    hue_jitter: float = 8.0


@dataclass
class SceneObject:
    """One drawn object: class id, centre (x, y) and diameter in pixels, rotation in radians, aspect factor, colours
    (primary and texture RGB in 0..255) and texture phase. Distractors have `class_id = -1`."""

    class_id: int
    center: tuple[float, float]
    size: float
    angle: float
    aspect: float
    colour: tuple[float, float, float]
    texture_colour: tuple[float, float, float]
    phase: tuple[float, float]
    shape: str = "circle"
    texture: str = "solid"


@dataclass
class Scene:
    """A scene: background parameters, the objects in drawing order (later ones on top) and a noise seed."""

    size: int
    background_grid: np.ndarray  # (g, g, 3) uint8 low-saturation colours, upsampled to the image
    objects: list[SceneObject] = field(default_factory=list)
    noise_seed: int = 0

    @property
    def class_ids(self) -> list[int]:
        return [obj.class_id for obj in self.objects if obj.class_id >= 0]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a unit shape (about the unit disc) in the object's own coordinates."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1.1
        inside = v <= 0.55
        for angle in (math.radians(30.0), math.radians(150.0)):
            inside &= -(u * math.cos(angle) + v * math.sin(angle)) <= 0.55
        return inside
    if shape == "star":  # five points, outer radius 1, inner 0.45
        radius = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u) + math.pi / 2
        t = np.abs(((phi * 5 / (2 * math.pi)) % 1.0) * 2 - 1)  # 0 at a point, 1 between two points
        return radius <= 1.0 - 0.55 * t
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.45**2)
    if shape == "cross":
        return ((np.abs(u) <= 0.38) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.38) & (np.abs(u) <= 0.95))
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 >= 0.85**2)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _texture_mask(texture: str, u_px: np.ndarray, v_px: np.ndarray, period: float) -> np.ndarray | None:
    """Where the texture colour replaces the primary colour (object coordinates in pixels); None for solid."""
    if texture == "solid":
        return None
    if texture == "stripes":
        return (u_px / period) % 1.0 < 0.45
    if texture == "dots":
        du = (u_px / period) % 1.0 - 0.5
        dv = (v_px / period) % 1.0 - 0.5
        return du * du + dv * dv < 0.28**2 * 1.8
    if texture == "checker":
        return (np.floor(u_px / period) + np.floor(v_px / period)) % 2 == 0
    raise ValueError(f"Unknown texture {texture!r}; expected one of {TEXTURES}.")


_SINGLE_PHRASES = (
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "there is a {} in the scene",
    "this is a photo of a {}",
    "this is a {}",
    "a single {}",
    "one {} on a plain background",
    "a close up photo of a {}",
    "a {} in the scene",
)
_SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "tiny": "small"}
_JOINERS = (" and ", " and ", " with ", " next to ", " beside ", " near ")
_LIST_PHRASES = (
    "a photo of {}",
    "{}",
    "a picture of {}",
    "there is {} in the scene",
    "a scene with {}",
    "this is a photo of {}",
    "{} on a plain background",
    "an image showing {}",
)


class SyntheticWorld:
    """
    Samples, renders and captions scenes of the synthetic world.

    Args:
        config ([`WorldConfig`], *optional*): the world's knobs.
        classes (`Sequence[SyntheticClass]`, *optional*, defaults to [`SYNTHETIC_CLASSES`]).
    """

    def __init__(self, config: WorldConfig | None = None, classes: Sequence[SyntheticClass] = SYNTHETIC_CLASSES):
        self.config = config or WorldConfig()
        self.classes = tuple(classes)
        if self.config.min_objects < 1 or self.config.max_objects < self.config.min_objects:
            raise ValueError("WorldConfig needs 1 <= min_objects <= max_objects.")
        size = self.config.image_size
        self._ys, self._xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- sampling ---------------------------------------------------------------------------------------------

    def _sample_object(
        self, rng: np.random.Generator, class_id: int, size_range: tuple[float, float], center_margin: float = 0.08
    ) -> SceneObject:
        side = self.config.image_size
        diameter = float(rng.uniform(*size_range)) * side
        center = tuple(float(c) for c in rng.uniform(center_margin * side, (1 - center_margin) * side, size=2))
        angle = float(rng.uniform(0, 2 * math.pi))
        aspect = float(rng.uniform(0.85, 1.15))
        if class_id < 0:  # grey distractor
            value = rng.uniform(0.25, 0.95)
            colour = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.2), value)
            texture_colour = colour
            shape = str(rng.choice(SHAPES))
            texture = "solid"
        else:
            synthetic_class = self.classes[class_id]
            hue = synthetic_class.hue + rng.uniform(-self.config.hue_jitter, self.config.hue_jitter)
            saturation = rng.uniform(0.75, 1.0)
            value = rng.uniform(0.7, 1.0)
            colour = _hsv_to_rgb(hue, saturation, value)
            if synthetic_class.texture == "dots":  # pale spots
                texture_colour = _hsv_to_rgb(hue, saturation * rng.uniform(0.5, 0.6), 1.0)
            else:  # dark stripes / squares
                texture_colour = _hsv_to_rgb(hue, saturation, value * rng.uniform(0.35, 0.5))
            shape, texture = synthetic_class.shape, synthetic_class.texture
        return SceneObject(
            class_id=class_id,
            center=center,
            size=diameter,
            angle=angle,
            aspect=aspect,
            colour=tuple(float(c) for c in colour),
            texture_colour=tuple(float(c) for c in texture_colour),
            phase=tuple(float(p) for p in rng.uniform(0, 1, size=2)),
            shape=shape,
            texture=texture,
        )

    def _sample_background(self, rng: np.random.Generator) -> np.ndarray:
        grid = int(rng.integers(2, 6))
        base_hue = rng.uniform(0, 360)
        hue = base_hue + rng.uniform(-40, 40, size=(grid, grid))
        saturation = rng.uniform(0.0, 0.22, size=(grid, grid))
        value = np.clip(rng.uniform(0.35, 0.9) + rng.uniform(-0.2, 0.2, size=(grid, grid)), 0.15, 1.0)
        return np.round(_hsv_to_rgb(hue, saturation, value)).astype(np.uint8)

    def sample_scene(
        self,
        rng: np.random.Generator,
        class_ids: Sequence[int] | None = None,
        size_range: tuple[float, float] | None = None,
        num_distractors: int | None = None,
    ) -> Scene:
        """
        A random scene. `class_ids` fixes the classes of the objects (in drawing order); by default 1..4 classes are
        drawn uniformly (repeats allowed). `size_range` overrides the object diameter range (fractions of the side).
        """
        config = self.config
        if class_ids is None:
            count = int(rng.integers(config.min_objects, config.max_objects + 1))
            class_ids = [int(c) for c in rng.integers(0, self.num_classes, size=count)]
        size_range = size_range or (config.min_object_size, config.max_object_size)
        if num_distractors is None:
            num_distractors = int(rng.integers(0, config.max_distractors + 1))
        objects = [self._sample_object(rng, -1, (0.15, 0.4), 0.0) for _ in range(num_distractors)]
        objects += [self._sample_object(rng, int(c), size_range) for c in class_ids]
        return Scene(
            size=config.image_size,
            background_grid=self._sample_background(rng),
            objects=objects,
            noise_seed=int(rng.integers(0, 2**31 - 1)),
        )

    # -- rendering --------------------------------------------------------------------------------------------

    def object_mask(self, obj: SceneObject) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
        """`(bbox slices, inside mask, u_px, v_px)` of one object over its bounding box (object coordinates in
        pixels, rotated with the object)."""
        side = self.config.image_size
        radius = 0.5 * obj.size * max(obj.aspect, 1 / obj.aspect) * 1.15 + 1
        cx, cy = obj.center
        y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 2, side)
        x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 2, side)
        box = (slice(y0, y1), slice(x0, x1))
        if y0 >= y1 or x0 >= x1:
            empty = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), dtype=bool)
            return box, empty, empty.astype(np.float32), empty.astype(np.float32)
        dx, dy = self._xs[box] - cx, self._ys[box] - cy
        cos, sin = math.cos(obj.angle), math.sin(obj.angle)
        u_px = cos * dx + sin * dy
        v_px = -sin * dx + cos * dy
        half = 0.5 * obj.size
        inside = _shape_mask(obj.shape, u_px / (half * obj.aspect), v_px / (half / obj.aspect))
        return box, inside, u_px, v_px

    def render(self, scene: Scene, noise_std: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """
        Draw a scene: an `(H, W, 3)` uint8 RGB image and its exact `(H, W)` uint8 label map (class id of the top-most
        object, 255 elsewhere). `noise_std` overrides the config's pixel noise (0 for noise-free images).
        """
        side = scene.size
        if side != self.config.image_size:
            raise ValueError(f"Scene of size {side} rendered by a world of size {self.config.image_size}.")
        grid = scene.background_grid.astype(np.float32)
        rows, cols = _bilinear_matrix(grid.shape[0], side), _bilinear_matrix(grid.shape[1], side)
        canvas = np.ascontiguousarray(np.matmul(rows, np.matmul(grid.transpose(2, 0, 1), cols.T)).transpose(1, 2, 0))
        label = np.full((side, side), 255, dtype=np.uint8)
        period = max(self.config.texture_period * side, 2.0)
        for obj in scene.objects:
            box, inside, u_px, v_px = self.object_mask(obj)
            if not inside.any():
                continue
            colour = np.asarray(obj.colour, dtype=np.float32)
            texture = _texture_mask(obj.texture, u_px + obj.phase[0] * period, v_px + obj.phase[1] * period, period)
            if texture is not None:
                colour = np.where(texture[..., None], np.asarray(obj.texture_colour, dtype=np.float32), colour)
            np.copyto(canvas[box], colour, where=inside[..., None])
            np.copyto(label[box], obj.class_id if obj.class_id >= 0 else 255, where=inside, casting="unsafe")
        noise_std = self.config.noise_std if noise_std is None else noise_std
        if noise_std > 0:
            # Gaussian noise through a 256-entry inverse-CDF table of random bytes: ~10x faster than sampling.
            noise_bytes = np.frombuffer(np.random.default_rng(scene.noise_seed).bytes(canvas.size), dtype=np.uint8)
            canvas += (_GAUSSIAN_QUANTILES[noise_bytes] * np.float32(noise_std)).reshape(canvas.shape)
        return np.clip(np.round(canvas), 0, 255).astype(np.uint8), label

    # -- captions ---------------------------------------------------------------------------------------------

    def visible_classes(self, label: np.ndarray) -> list[int]:
        """Classes covering at least `min_caption_pixels` of the label map, ascending."""
        counts = np.bincount(label.ravel(), minlength=256)[: self.num_classes]
        threshold = self.config.min_caption_pixels * label.size
        return [int(c) for c in np.flatnonzero(counts >= max(threshold, 1))]

    def caption(
        self,
        rng: np.random.Generator,
        class_ids: Sequence[int],
        label: np.ndarray | None = None,
        shares: dict[int, float] | None = None,
    ) -> str:
        """
        A caption naming `class_ids` (each once, random order, random phrasing). With `label` (or `shares`, the share
        of the image each class covers), a class may get a size word ("small", "tiny", "large", "big"). An empty
        list gives a caption about the background.
        """
        class_ids = list(dict.fromkeys(int(c) for c in class_ids))
        if not class_ids:
            return str(rng.choice(["an empty scene", "a plain background", "a photo of nothing in particular"]))
        if shares is None and label is not None:
            counts = np.bincount(label.ravel(), minlength=256)
            shares = {c: counts[c] / label.size for c in class_ids}
        rng.shuffle(class_ids)
        words = []
        for class_id in class_ids:
            name = self.classes[class_id].name
            if shares is not None and rng.random() < 0.3:
                share = shares.get(class_id, 0.05)
                if share < 0.03:
                    name = f"{rng.choice(['small', 'tiny'])} {name}"
                elif share > 0.12:
                    name = f"{rng.choice(['large', 'big'])} {name}"
            words.append(name)
        if len(words) == 1:
            return str(rng.choice(_SINGLE_PHRASES)).format(words[0])
        items = [f"a {w}" for w in words]
        if len(items) == 2 and rng.random() < 0.5:
            return items[0] + str(rng.choice(_JOINERS)) + items[1]
        listed = " ".join(items[:-1]) if rng.random() < 0.3 else " and ".join(items[:-1])
        listed = f"{listed} and {items[-1]}"
        return str(rng.choice(_LIST_PHRASES)).format(listed)

    # -- batches ----------------------------------------------------------------------------------------------

    def sample(
        self,
        rng: np.random.Generator,
        class_ids: Sequence[int] | None = None,
        size_range: tuple[float, float] | None = None,
        num_distractors: int | None = None,
        noise_std: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str, list[int]]:
        """One `(image, label, caption, visible class ids)` sample (see [`sample_scene`], [`render`])."""
        scene = self.sample_scene(rng, class_ids, size_range, num_distractors)
        image, label = self.render(scene, noise_std)
        visible = self.visible_classes(label)
        return image, label, self.caption(rng, visible, label), visible

    def generate(
        self, num_samples: int, seed: int = 0, **kwargs
    ) -> Iterator[tuple[np.ndarray, np.ndarray, str, list[int]]]:
        """`num_samples` seeded samples (see [`sample`])."""
        rng = np.random.default_rng(seed)
        for _ in range(num_samples):
            yield self.sample(rng, **kwargs)


def load_synthetic_benchmark(folder: str | os.PathLike | None = None) -> Benchmark:
    """The benchmark stored in `folder/benchmark.json` by [`write_synthetic_dataset`] ([`synthetic_benchmark`] if
    `folder` is None)."""
    if folder is None:
        return synthetic_benchmark()
    data = json.loads((Path(folder) / BENCHMARK_FILE).read_text(encoding="utf-8"))
    return Benchmark(
        name=data["name"],
        class_names=tuple(data["class_names"]),
        unseen_class_ids=tuple(data["unseen_class_ids"]),
        templates=tuple(data["templates"]),
        palette=tuple(tuple(colour) for colour in data["palette"]),
        ignore_index=data.get("ignore_index", 255),
    )


def write_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 2000,
    num_validation: int = 300,
    seed: int = 0,
    config: WorldConfig | None = None,
) -> Path:
    """
    Generate the synthetic segmentation dataset and save it at `output_dir` with `save_to_disk`.

    Splits `train` and `validation` (drawn from independent seeded streams), columns `image` (PNG RGB), `label`
    (PNG "L", class ids 0..11, 255 = background / ignore), `caption` (str) and `class_ids` (visible classes); plus
    `benchmark.json` (the [`synthetic_benchmark`]) and `world.json` (the [`WorldConfig`] and seed). Load it with
    `clip_rc.data.load_segmentation_dataset(output_dir, benchmark=load_synthetic_benchmark(output_dir))`.

    Returns:
        `Path`: `output_dir`.
    """
    import datasets

    config = config or WorldConfig()
    world = SyntheticWorld(config)
    output_dir = Path(output_dir)
    splits = {}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            "caption": datasets.Value("string"),
            "class_ids": datasets.List(datasets.Value("int32")),
        }
    )
    for split_index, (split, count) in enumerate((("train", num_train), ("validation", num_validation))):
        columns = {"image": [], "label": [], "caption": [], "class_ids": []}
        for image, label, caption, visible in world.generate(count, seed=seed * 1000 + split_index):
            columns["image"].append(PIL.Image.fromarray(image))  # stored as PNG by the `Image` feature
            columns["label"].append(PIL.Image.fromarray(label))
            columns["caption"].append(caption)
            columns["class_ids"].append(visible)
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict(splits).save_to_disk(os.fspath(output_dir))
    write_json_atomic(output_dir / BENCHMARK_FILE, asdict(synthetic_benchmark()))
    write_json_atomic(output_dir / "world.json", {"seed": seed, **asdict(config)})
    return output_dir
