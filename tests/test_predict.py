"""`clip-rc-predict` and `transformers.pipeline` support on a tiny saved CLIP-RC model (no downloads)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from clip_rc import CLIPRCForSemanticSegmentation
from clip_rc.class_sets import get_benchmark
from clip_rc.commands.predict import main
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor
from clip_rc.pipelines import ZERO_SHOT_TASK, CLIPRCSegmentationPipeline, CLIPRCZeroShotSegmentationPipeline
from clip_rc.visualization import class_palette, draw_legend, overlay_label_map, save_label_map

from .random_clip import save_random_clip
from .test_evaluation import reference_label_map, save_model_folder


CLASSES = ["sky", "tree", "car", "person"]
SIZES = [(61, 47), (37, 70), (64, 64), (90, 130)]  # (height, width), odd ones included


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return save_model_folder(root / "model", save_random_clip(root / "clip"))  # classes cat, dog, grass


@pytest.fixture(scope="module")
def model(model_dir):
    return CLIPRCForSemanticSegmentation.from_pretrained(model_dir).eval()


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


def class_embeddings(model, model_dir, class_names):
    """Independent encoding of class names: the tokenizer's own padding, the text tower."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    templates = model.config.prompt_templates
    prompts = tokenizer([t.format(name) for name in class_names for t in templates], padding=True, return_tensors="pt")
    shape = (len(class_names), len(templates), -1)
    return model.clip_rc.encode_class_prompts(prompts["input_ids"].view(shape), prompts["attention_mask"].view(shape))


def expected_map(model, model_dir, image, class_names=None):
    if class_names is None:
        return reference_label_map(model, image, (image.height, image.width))
    text_embeds = class_embeddings(model, model_dir, class_names)
    return reference_label_map(model, image, (image.height, image.width), text_embeds, torch.zeros(len(class_names)))


def segments_to_label_map(segments, class_names, size) -> np.ndarray:
    """The label map a pipeline's masks describe; every pixel must be in exactly one mask."""
    height, width = size
    coverage, label_map = np.zeros((height, width), dtype=np.int64), np.full((height, width), -1)
    for segment in segments:
        assert segment["mask"].mode == "L" and segment["mask"].size == (width, height)
        assert 0.0 <= segment["score"] <= 1.0
        mask = np.asarray(segment["mask"]) == 255
        coverage += mask
        label_map[mask] = class_names.index(segment["label"])
    assert (coverage == 1).all()
    return label_map


# ---- clip-rc-predict -----------------------------------------------------------------------------------------------


def test_predict_writes_label_maps_and_overlays_for_classes_given_at_run_time(model, model_dir, images, tmp_path):
    output_dir = tmp_path / "out"
    assert main(["--model", str(model_dir), "--classes", ",".join(CLASSES), *map(str, images),
                 "--output_dir", str(output_dir)]) == 0  # fmt: skip
    for path, (height, width) in zip(images, SIZES):
        label_map = Image.open(output_dir / f"{path.stem}_labels.png")
        overlay = Image.open(output_dir / f"{path.stem}_overlay.png")
        assert label_map.mode == "P" and label_map.size == (width, height)
        assert overlay.mode == "RGB" and overlay.size == (width, height)
        expected = expected_map(model, model_dir, Image.open(path).convert("RGB"), CLASSES)
        assert np.array_equal(np.asarray(label_map), expected.numpy())
    assert not [path for path in output_dir.iterdir() if path.name.startswith(".")]  # no temporary file left


def test_predict_gives_every_input_its_own_files_and_never_overwrites(model, model_dir, images, tmp_path):
    inputs = []
    for folder, name in (("a", "x.jpg"), ("b", "x.jpg"), ("c", "x_1.jpg")):
        (tmp_path / folder).mkdir()
        Image.open(images[index := len(inputs)]).save(tmp_path / folder / name)
        inputs.append((tmp_path / folder / name, images[index]))
    output_dir = tmp_path / "out"
    assert main(["--model", str(model_dir), *(str(path) for path, _ in inputs), "--output_dir", str(output_dir)]) == 0
    names = sorted(path.name for path in output_dir.iterdir())
    assert names == sorted(f"{stem}_{kind}.png" for stem in ("x", "x_1", "x_1_1") for kind in ("labels", "overlay"))
    for (path, _), stem in zip(inputs, ("x", "x_1", "x_1_1")):
        expected = expected_map(model, model_dir, Image.open(path).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(output_dir / f"{stem}_labels.png")), expected.numpy())

    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    assert main(["--model", str(model_dir), str(inputs[1][0]), "--output_dir", str(output_dir)]) == 1
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == before
    assert main(["--model", str(model_dir), str(inputs[1][0]), "--output_dir", str(output_dir), "--overwrite"]) == 0


def test_predict_names_unreadable_images_finishes_the_others_and_fails(model_dir, images, tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Image.open(images[0]).tobytes()[:100])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images[1].read_bytes()[:200])
    output_dir = tmp_path / "out"
    status = main(
        ["--model", str(model_dir), str(broken), str(images[2]), str(truncated), "--output_dir", str(output_dir)]
    )
    assert status == 1
    assert str(broken) in caplog.text and str(truncated) in caplog.text and "2 of 3 image(s) failed" in caplog.text
    assert sorted(path.name for path in output_dir.iterdir()) == ["image2_labels.png", "image2_overlay.png"]


def test_predict_argument_errors(model_dir, images, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), str(tmp_path / "missing.jpg")])
    for classes in ("cat,cat", ",", "cat,,dog"):
        with pytest.raises(SystemExit):
            main(["--model", str(model_dir), "--classes", classes, str(images[0])])


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


def test_image_segmentation_pipeline_equals_the_protocol_in_any_batch(model, model_dir, images):
    segmenter = pipeline("image-segmentation", model=str(model_dir), trust_remote_code=True)
    assert type(segmenter).__name__ == "CLIPRCSegmentationPipeline"
    pil_images = [Image.open(path).convert("RGB") for path in images]
    one_by_one = segmenter(pil_images)
    batched = segmenter(pil_images, batch_size=3)
    for image, segments, batch_segments in zip(pil_images, one_by_one, batched):
        label_map = segments_to_label_map(segments, ["cat", "dog", "grass"], (image.height, image.width))
        assert np.array_equal(label_map, expected_map(model, model_dir, image).numpy())
        assert [(s["label"], s["score"]) for s in segments] == [(s["label"], s["score"]) for s in batch_segments]
        assert all(
            np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) for a, b in zip(segments, batch_segments)
        )
    # Paths work too, as with every image pipeline.
    assert segmenter(str(images[0]))[0]["mask"].size == (SIZES[0][1], SIZES[0][0])


def test_candidate_labels_in_any_batch(model, model_dir, images):
    image_processor = CLIPRCImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # An in-memory model: the pipeline class directly (pipeline() finds the task only in a saved folder's config).
    zero_shot = CLIPRCZeroShotSegmentationPipeline(model=model, image_processor=image_processor, tokenizer=tokenizer)
    pil_images = [Image.open(path).convert("RGB") for path in images]
    one_by_one = zero_shot(pil_images, candidate_labels=CLASSES)
    batched = zero_shot(pil_images, candidate_labels=CLASSES, batch_size=2)
    for image, segments, batch_segments in zip(pil_images, one_by_one, batched):
        label_map = segments_to_label_map(segments, CLASSES, (image.height, image.width))
        assert np.array_equal(label_map, expected_map(model, model_dir, image, CLASSES).numpy())
        assert [(s["label"], s["score"]) for s in segments] == [(s["label"], s["score"]) for s in batch_segments]
    # A comma-separated string gives the same labels; without candidate labels, the model's own classes.
    image = pil_images[1]
    labels = [s["label"] for s in one_by_one[1]]
    assert [s["label"] for s in zero_shot(image, candidate_labels=",".join(CLASSES))] == labels
    assert {s["label"] for s in zero_shot(image)} <= {"cat", "dog", "grass"}
    with pytest.raises(ValueError, match="repeat"):
        zero_shot(image, candidate_labels=["sky", "sky"])
    with pytest.raises(ValueError, match="template"):
        zero_shot(image, candidate_labels=CLASSES, templates=["no slot"])


def test_a_fresh_process_gets_the_same_pipelines_from_the_folder(model, model_dir, images, tmp_path):
    """A process that never imports clip_rc: `pipeline(task, folder, trust_remote_code=True)` serves the folder's
    own pipelines, with the output of the in-process ones."""
    in_process = CLIPRCSegmentationPipeline(
        model=model, image_processor=CLIPRCImageProcessor.from_pretrained(model_dir)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    zero_shot = CLIPRCZeroShotSegmentationPipeline(
        model=model, image_processor=in_process.image_processor, tokenizer=tokenizer
    )
    expected = {
        "own": [[(s["label"], s["score"], np.asarray(s["mask"]).tolist()) for s in in_process(str(path))] for path in images],
        "zero_shot": [[(s["label"], s["score"], np.asarray(s["mask"]).tolist())
                       for s in zero_shot(str(path), candidate_labels=CLASSES)] for path in images],
    }  # fmt: skip
    script = textwrap.dedent(
        f"""
        import json, sys, numpy as np, torch
        from transformers import pipeline
        torch.set_num_threads({torch.get_num_threads()})
        paths = {[str(path) for path in images]!r}
        own = pipeline("image-segmentation", model={str(model_dir)!r}, trust_remote_code=True)
        zero_shot = pipeline("zero-shot-image-segmentation", model={str(model_dir)!r}, trust_remote_code=True)
        assert "clip_rc" not in sys.modules, "the package itself was imported"
        result = {{
            "own": [[(s["label"], s["score"], np.asarray(s["mask"]).tolist()) for s in own(path)] for path in paths],
            "zero_shot": [[(s["label"], s["score"], np.asarray(s["mask"]).tolist())
                           for s in zero_shot(path, candidate_labels={CLASSES!r}, batch_size=2)] for path in paths],
            "classes": [type(own).__module__, type(zero_shot).__module__],
        }}
        print(json.dumps(result))
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert all("transformers_modules" in module for module in fresh["classes"])
    for key in ("own", "zero_shot"):
        assert json.loads(json.dumps(expected[key])) == fresh[key], key


def test_importing_clip_rc_leaves_other_models_pipelines_alone(tmp_path, images):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil
    from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

    script = (
        "from transformers.pipelines import PIPELINE_REGISTRY as registry; before = repr(registry.supported_tasks); "
        "import clip_rc; assert repr(registry.supported_tasks) == before, 'clip_rc changed the pipeline registry'"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ZERO_SHOT_TASK not in PIPELINE_REGISTRY.supported_tasks
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3], strides=[2],
        num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
    )  # fmt: skip
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "segformer")
    segmenter = pipeline("image-segmentation", model=str(tmp_path / "segformer"))
    assert type(segmenter) is ImageSegmentationPipeline
    assert segmenter(Image.open(images[0]).convert("RGB"))
    with pytest.raises(ValueError, match="CLIP-RC"):
        CLIPRCSegmentationPipeline(model=segmenter.model, image_processor=segmenter.image_processor)
