"""`clip-rc-predict` and `transformers.pipeline` support on a tiny saved CLIP-RC model (no downloads)."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip_rc import CLIPRCForSemanticSegmentation
from clip_rc.benchmarks import get_benchmark
from clip_rc.modeling_clip_rc import tokenize_class_prompts
from clip_rc.pipelines import (
    ZERO_SHOT_TASK,
    CLIPRCSegmentationPipeline,
    CLIPRCZeroShotSegmentationPipeline,
    register_pipelines,
)
from clip_rc.predict import class_palette, draw_legend, main, overlay_label_map, save_label_map
from clip_rc.processing_clip_rc import CLIPRCImageProcessor

from .test_evaluation import save_model_folder
from .tiny_clip import save_tiny_clip


CLASSES = ["sky", "tree", "car", "person"]
SIZES = [(61, 47), (37, 70), (64, 64)]  # (height, width), odd ones included


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return save_model_folder(root / "model", save_tiny_clip(root / "clip"))  # classes cat, dog, grass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(SIZES):
        path = folder / f"image{index}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def reference_label_map(model_dir, image: Image.Image, class_names=None) -> torch.Tensor:
    """Independent path: image processor (short side = crop size) + `model.segment`."""
    from transformers import AutoTokenizer

    model = CLIPRCForSemanticSegmentation.from_pretrained(model_dir).eval()
    text_embeds = None
    if class_names is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = tokenize_class_prompts(tokenizer, class_names, model.config.prompt_templates)
        text_embeds = model.encode_text(**prompts)
    pixel_values = CLIPRCImageProcessor(size={"shortest_edge": 64})(image, return_tensors="pt")["pixel_values"]
    return model.segment(pixel_values, original_sizes=[(image.height, image.width)], text_embeds=text_embeds)[0]


# ---- clip-rc-predict -----------------------------------------------------------------------------------------------


def test_predict_writes_label_maps_and_overlays_for_classes_given_at_run_time(model_dir, images, tmp_path):
    output_dir = tmp_path / "out"
    assert main(["--model", str(model_dir), "--classes", ",".join(CLASSES), *map(str, images),
                 "--output_dir", str(output_dir)]) == 0  # fmt: skip
    assert len(list(output_dir.glob("*_labels.png"))) == len(images)
    for path, (height, width) in zip(images, SIZES):
        label_map = Image.open(output_dir / f"{path.stem}_labels.png")
        overlay = Image.open(output_dir / f"{path.stem}_overlay.png")
        assert label_map.mode == "P" and label_map.size == (width, height)
        assert overlay.mode == "RGB" and overlay.size == (width, height)
        values = np.asarray(label_map)
        assert values.max() < len(CLASSES)
        expected = reference_label_map(model_dir, Image.open(path).convert("RGB"), CLASSES)
        assert np.array_equal(values, expected.numpy())


def test_predict_defaults_to_the_models_own_classes_and_keeps_names_unique(model_dir, images, tmp_path):
    twin = tmp_path / images[0].name  # same stem as images[0], other folder
    Image.open(images[0]).save(twin)
    assert main(["--model", str(model_dir), str(images[0]), str(twin), "--output_dir", str(tmp_path / "out")]) == 0
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    stem = images[0].stem
    assert names == sorted([f"{stem}_labels.png", f"{stem}_overlay.png", f"{stem}_1_labels.png",
                            f"{stem}_1_overlay.png"])  # fmt: skip
    expected = reference_label_map(model_dir, Image.open(images[0]).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{stem}_labels.png")), expected.numpy())


def test_predict_argument_errors(model_dir, images, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), str(tmp_path / "missing.jpg")])
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--classes", "cat,cat", str(images[0])])


def test_visualisation_helpers(tmp_path):
    voc = get_benchmark("voc")
    assert class_palette(voc.class_names) == [tuple(colour) for colour in voc.palette]
    generated = class_palette(["a", "b", "c"])
    assert len(set(generated)) == 3
    image = Image.new("RGB", (33, 21), (200, 200, 200))
    labels = np.zeros((21, 33), dtype=np.int64)
    labels[:, 20:] = 2
    overlay = overlay_label_map(image, labels, generated, ["a", "b", "c"])
    assert overlay.size == image.size
    assert draw_legend(Image.new("RGB", (5, 5)), [("a long class name", (1, 2, 3))]).size == (5, 5)
    save_label_map(labels, generated, tmp_path / "small.png")
    assert Image.open(tmp_path / "small.png").mode == "P"
    wide = np.full((4, 4), 300, dtype=np.int64)  # more than 256 classes: 16-bit PNG
    save_label_map(wide, class_palette([str(i) for i in range(301)]), tmp_path / "wide.png")
    assert np.asarray(Image.open(tmp_path / "wide.png")).max() == 300


# ---- transformers.pipeline ---------------------------------------------------------------------------------------


def test_image_segmentation_pipeline_on_a_saved_folder(model_dir, images):
    from transformers import pipeline

    register_pipelines()  # done by `import clip_rc`; idempotent
    segmenter = pipeline("image-segmentation", model=str(model_dir))
    assert isinstance(segmenter, CLIPRCSegmentationPipeline)
    for path, (height, width) in zip(images, SIZES):
        image = Image.open(path).convert("RGB")
        segments = segmenter(image)
        assert segments and {segment["label"] for segment in segments} <= {"cat", "dog", "grass"}
        coverage = np.zeros((height, width), dtype=np.int64)
        label_map = np.full((height, width), -1)
        for segment in segments:
            assert segment["mask"].mode == "L" and segment["mask"].size == (width, height)
            assert 0.0 <= segment["score"] <= 1.0
            mask = np.asarray(segment["mask"]) == 255
            coverage += mask
            label_map[mask] = ["cat", "dog", "grass"].index(segment["label"])
        assert (coverage == 1).all()  # the masks partition the image
        assert np.array_equal(label_map, reference_label_map(model_dir, image).numpy())
    # Paths work too, as with every image pipeline.
    assert segmenter(str(images[0]))[0]["mask"].size == (SIZES[0][1], SIZES[0][0])


def test_candidate_labels_change_the_labels(model_dir, images):
    from transformers import pipeline

    register_pipelines()
    image = Image.open(images[1]).convert("RGB")
    zero_shot = pipeline(ZERO_SHOT_TASK, model=str(model_dir))
    assert isinstance(zero_shot, CLIPRCZeroShotSegmentationPipeline)
    segments = zero_shot(image, candidate_labels=CLASSES)
    assert segments and {segment["label"] for segment in segments} <= set(CLASSES)
    assert all(segment["mask"].size == image.size for segment in segments)
    label_map = np.full(image.size[::-1], -1)
    for segment in segments:
        label_map[np.asarray(segment["mask"]) == 255] = CLASSES.index(segment["label"])
    assert np.array_equal(label_map, reference_label_map(model_dir, image, CLASSES).numpy())
    # A comma-separated string and the "image-segmentation" task with candidate_labels give the same labels.
    assert [s["label"] for s in zero_shot(image, candidate_labels=",".join(CLASSES))] == [s["label"] for s in segments]
    segmenter = pipeline("image-segmentation", model=str(model_dir), pipeline_class=CLIPRCSegmentationPipeline)
    assert [s["label"] for s in segmenter(image, candidate_labels=CLASSES)] == [s["label"] for s in segments]
    # Without candidate labels: the model's own classes.
    assert {s["label"] for s in zero_shot(image)} <= {"cat", "dog", "grass"}


def test_other_models_keep_the_stock_image_segmentation_behaviour(tmp_path, images):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, pipeline
    from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

    register_pipelines()
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3], strides=[2],
        num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
    )  # fmt: skip
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path / "segformer")
    from transformers import SegformerImageProcessorPil

    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "segformer")
    image = Image.open(images[0]).convert("RGB")
    ours = pipeline("image-segmentation", model=str(tmp_path / "segformer"))(image)
    stock = ImageSegmentationPipeline(
        model=model, image_processor=SegformerImageProcessorPil(size={"height": 32, "width": 32})
    )(image)
    assert [(s["label"], s["score"]) for s in ours] == [(s["label"], s["score"]) for s in stock]
    assert all(np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) for a, b in zip(ours, stock))
    with pytest.raises(ValueError, match="CLIP-RC"):
        pipeline(ZERO_SHOT_TASK, model=str(tmp_path / "segformer"))
