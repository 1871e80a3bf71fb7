"""One inference path: every entry point gives the same label maps on the same mixed-size images.

processor -> model -> `post_process_semantic_segmentation` (the Python API), `clip_rc.inference.segment_images`,
`evaluate_model` (eval.py's scoring), `clip-rc-predict`'s label maps, and both pipelines (one image at a time and in
batches), all against the reference protocol written out independently in `tests/test_evaluation.py`.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, AutoProcessor

from clip_rc.commands.predict import main as predict_main
from clip_rc.evaluation import evaluate_model
from clip_rc.inference import segment_images
from clip_rc.pipelines import CLIPRCSegmentationPipeline, CLIPRCZeroShotSegmentationPipeline

from .random_clip import save_random_clip
from .test_evaluation import reference_label_map, save_model_folder


SIZES = [(61, 47), (37, 70), (64, 64), (90, 130), (20, 25)]  # (height, width): portrait, landscape, small


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path")
    model_dir = save_model_folder(root / "model", save_random_clip(root / "clip"))
    rng = np.random.default_rng(1)
    paths = []
    for index, (height, width) in enumerate(SIZES):
        paths.append(root / f"image{index}.png")
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    model = AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    images = [Image.open(path).convert("RGB") for path in paths]
    expected = [reference_label_map(model, image, (image.height, image.width)) for image in images]
    return {
        "root": root,
        "model_dir": model_dir,
        "paths": paths,
        "model": model,
        "images": images,
        "expected": expected,
    }


def assert_same_maps(maps, expected):
    assert len(maps) == len(expected)
    for label_map, reference in zip(maps, expected):
        assert torch.equal(torch.tensor(np.asarray(label_map), dtype=torch.long), reference)


def pipeline_label_map(segments, class_names, size) -> np.ndarray:
    label_map = np.full(size, -1)
    for segment in segments:
        label_map[np.asarray(segment["mask"]) == 255] = class_names.index(segment["label"])
    assert (label_map >= 0).all()
    return label_map


def test_every_entry_point_gives_the_reference_protocols_label_maps(setup, tmp_path):
    model, images, expected = setup["model"], setup["images"], setup["expected"]
    processor = AutoProcessor.from_pretrained(setup["model_dir"])
    sizes = [(image.height, image.width) for image in images]

    # The Python API: processor -> model -> post-processing, all images in one batch.
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    assert_same_maps(processor.post_process_semantic_segmentation(outputs, target_sizes=sizes), expected)

    # The commands' helper.
    assert_same_maps(segment_images(model, processor.image_processor, images), expected)

    # eval.py's scoring: the images as an evaluation split whose labels are the expected maps.
    split = [
        {"image": image, "label": Image.fromarray(label.numpy().astype(np.uint8))}
        for image, label in zip(images, expected)
    ]
    scored = {}
    results = evaluate_model(
        model, split, image_processor=processor.image_processor, batch_size=2, progress=False,
        on_prediction=lambda index, prediction, _label: scored.__setitem__(index, prediction),
    )  # fmt: skip
    assert_same_maps([scored[index] for index in range(len(images))], expected)
    assert results["overall_accuracy"] == 1.0

    # clip-rc-predict's label maps.
    assert (
        predict_main(["--model", str(setup["model_dir"]), *map(str, setup["paths"]), "--output_dir", str(tmp_path)])
        == 0
    )
    assert_same_maps([Image.open(tmp_path / f"{path.stem}_labels.png") for path in setup["paths"]], expected)

    # Both pipelines, one image at a time and in batches of mixed sizes.
    class_names = model.config.class_names
    segmenter = CLIPRCSegmentationPipeline(model=model, image_processor=processor.image_processor)
    zero_shot = CLIPRCZeroShotSegmentationPipeline(
        model=model, image_processor=processor.image_processor, tokenizer=processor.tokenizer
    )
    for results_per_image in (segmenter(images), segmenter(images, batch_size=2), zero_shot(images, batch_size=3)):
        maps = [pipeline_label_map(segments, class_names, size) for segments, size in zip(results_per_image, sizes)]
        assert_same_maps(maps, expected)


def test_tensor_entry_point_gives_the_same_label_maps(setup):
    """`model.sliding_window_labels` on resized, normalised tensors: the processor's windows and post-processing."""
    model, image = setup["model"], setup["images"][3]  # 90 x 130: several windows
    processor = AutoProcessor.from_pretrained(setup["model_dir"])
    whole = processor.image_processor(images=[image, image], do_sliding_window=False, return_tensors="pt")
    labels = model.sliding_window_labels(whole["pixel_values"])
    resized_size = tuple(whole["image_sizes"][0].tolist())
    expected = reference_label_map(model, image, resized_size)
    assert labels.shape == (2, *resized_size)
    assert torch.equal(labels[0], expected) and torch.equal(labels[1], expected)
