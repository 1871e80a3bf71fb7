"""The shapes world of `clip_rc.toy.synthetic`: exact label maps, captions, seeding, the benchmark, the dataset."""

import itertools
import re
import time

import numpy as np
import pytest

from clip_rc.class_sets import Benchmark
from clip_rc.data import load_segmentation_dataset
from clip_rc.toy.synthetic import (
    BACKGROUND_MAX_SATURATION,
    HUES,
    OBJECT_MIN_SATURATION,
    SYNTHETIC_CLASSES,
    SYNTHETIC_UNSEEN_CLASS_IDS,
    SyntheticWorld,
    WorldConfig,
    load_synthetic_benchmark,
    pixel_saturation,
    synthetic_benchmark,
    write_synthetic_dataset,
)


NAMES = [c.name for c in SYNTHETIC_CLASSES]


def _hue(image: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of an (..., 3) RGB array."""
    rgb = image.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = np.maximum(high - low, 1e-9)
    hue = np.where(high == r, ((g - b) / chroma) % 6, np.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return hue * 60.0


def _hue_distance(a, b):
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


def test_classes_form_a_combinatorial_world():
    assert len(SYNTHETIC_CLASSES) >= 10
    assert len(set(NAMES)) == len(NAMES)
    for a, b in itertools.combinations(SYNTHETIC_CLASSES, 2):
        differences = sum(getattr(a, key) != getattr(b, key) for key in ("shape", "colour", "texture"))
        assert differences >= 2, (a, b)
    # every attribute of an unseen class is also worn by some seen class: none is recognisable by one novel attribute
    seen = [c for i, c in enumerate(SYNTHETIC_CLASSES) if i not in SYNTHETIC_UNSEEN_CLASS_IDS]
    for class_id in SYNTHETIC_UNSEEN_CLASS_IDS:
        for key in ("shape", "colour", "texture"):
            assert getattr(SYNTHETIC_CLASSES[class_id], key) in {getattr(c, key) for c in seen}
    # the names say nothing about the looks
    for c in SYNTHETIC_CLASSES:
        assert c.shape not in c.name and c.colour not in c.name and c.texture not in c.name


def test_benchmark_definition():
    benchmark = synthetic_benchmark()
    assert isinstance(benchmark, Benchmark)
    assert benchmark.name == "synthetic-shapes"
    assert benchmark.class_names == tuple(NAMES)
    assert benchmark.unseen_class_ids == SYNTHETIC_UNSEEN_CLASS_IDS
    assert len(benchmark.unseen_class_ids) == 3 and len(benchmark.seen_class_ids) == 9
    assert benchmark.templates == ("a photo of a {}",)
    assert len(set(benchmark.palette)) == benchmark.num_classes


@pytest.mark.parametrize("image_size", [64, 96, 128])
def test_label_maps_match_the_drawn_pixels(image_size):
    """Noise-free renders: every labelled pixel shows a saturated colour of its class's hue, every pixel labelled
    ignore shows the unsaturated background or a grey distractor; objects are occluded in drawing order."""
    world = SyntheticWorld(WorldConfig(image_size=image_size))
    rng = np.random.default_rng(image_size)
    labelled_total = 0
    for _ in range(60):
        scene = world.sample_scene(rng)
        image, label = world.render(scene, noise_std=0)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        assert label.shape == (image_size, image_size) and label.dtype == np.uint8
        saturation = pixel_saturation(image)
        objects = label != 255
        labelled_total += objects.sum()
        assert set(np.unique(label)) <= set(range(len(SYNTHETIC_CLASSES))) | {255}
        assert np.all(saturation[objects] >= OBJECT_MIN_SATURATION - 0.02)
        assert np.all(saturation[~objects] <= BACKGROUND_MAX_SATURATION)
        hue = _hue(image)
        for class_id in np.unique(label[objects]):
            expected = HUES[SYNTHETIC_CLASSES[class_id].colour]
            assert np.all(_hue_distance(hue[label == class_id], expected) <= world.config.hue_jitter + 3)

        # occlusion: each object's own mask, minus the masks of the objects drawn after it, is labelled with it
        expected = np.full_like(label, 255)
        for obj in scene.objects:
            box, inside, _, _ = world.object_mask(obj)
            expected[box][inside] = obj.class_id if obj.class_id >= 0 else 255
        np.testing.assert_array_equal(label, expected)
    assert labelled_total > 0


def test_noise_is_mild_and_leaves_the_labels_alone():
    world = SyntheticWorld()
    scene = world.sample_scene(np.random.default_rng(3))
    clean, clean_label = world.render(scene, noise_std=0)
    noisy, noisy_label = world.render(scene)
    np.testing.assert_array_equal(clean_label, noisy_label)
    difference = noisy.astype(np.float64) - clean.astype(np.float64)
    assert 2.0 < difference.std() < 6.0


def test_scenes_vary():
    world = SyntheticWorld()
    samples = list(world.generate(200, seed=5))
    counts = [len(set(np.unique(label)) - {255}) for _, label, _, _ in samples]
    assert min(counts) <= 1 and max(counts) >= 4
    present = set().union(*(set(visible) for _, _, _, visible in samples))
    assert present == set(range(len(SYNTHETIC_CLASSES)))
    shares = [np.mean(label != 255) for _, label, _, _ in samples]
    assert min(shares) < 0.05 and max(shares) > 0.3
    assert len({caption for _, _, caption, _ in samples}) > 150


def test_captions_name_exactly_the_visible_classes():
    world = SyntheticWorld()
    for _, label, caption, visible in world.generate(300, seed=7):
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
        named = {word for word in caption.split() if word in NAMES}
        assert named == {NAMES[c] for c in visible}, (caption, visible)
        counts = np.bincount(label.ravel(), minlength=256)
        for class_id in visible:
            assert counts[class_id] >= world.config.min_caption_pixels * label.size
        assert len(caption.split()) <= 24


def test_generation_is_seeded():
    world = SyntheticWorld()
    first = list(world.generate(5, seed=11))
    second = list(world.generate(5, seed=11))
    other = list(world.generate(5, seed=12))
    for (i1, l1, c1, _), (i2, l2, c2, _) in zip(first, second):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)
        assert c1 == c2
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_generation_is_fast():
    world = SyntheticWorld()
    start = time.process_time()
    list(world.generate(500, seed=0))
    # about 2 ms of CPU per 96 px image; generous bound for a busy machine
    assert time.process_time() - start < 15


def test_dataset_loads_with_the_data_loaders(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "world", num_train=12, num_validation=5, seed=3)
    benchmark = load_synthetic_benchmark(folder)
    assert benchmark == synthetic_benchmark()
    dataset = load_segmentation_dataset(folder, benchmark=benchmark)
    assert set(dataset) == {"train", "validation"}
    assert len(dataset["train"]) == 12 and len(dataset["validation"]) == 5
    # the stored pixels are exactly the generated ones (train split = stream seed * 1000)
    world = SyntheticWorld()
    for index, (image, label, _, _) in enumerate(world.generate(12, seed=3000)):
        sample = dataset["train"][index]
        assert sample["image"].mode == "RGB" and sample["label"].mode == "L"
        np.testing.assert_array_equal(np.asarray(sample["image"]), image)
        np.testing.assert_array_equal(np.asarray(sample["label"]), label)
    # captions and visible classes are stored beside the images
    import datasets

    raw = datasets.load_from_disk(str(folder))
    assert {"image", "label", "caption", "class_ids"} <= set(raw["train"].column_names)
    for caption, class_ids in zip(raw["train"]["caption"], raw["train"]["class_ids"]):
        assert {w for w in caption.split() if w in NAMES} == {NAMES[c] for c in class_ids}
    assert (folder / "benchmark.json").is_file() and (folder / "world.json").is_file()
