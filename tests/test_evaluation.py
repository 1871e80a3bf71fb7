"""`eval.py` / `clip_rc.commands.evaluate` end to end on a tiny saved model and generated data (no downloads).

The validation label maps of the generated VOC tree are written from the tiny model's own predictions (computed
independently here by `reference_label_map`, a loop over windows on the model's forward alone), then perturbed, so
that the figures are far from trivial and any misalignment between predictions and labels in the evaluation shows up.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_rc import CLIPRCForSemanticSegmentation
from clip_rc.class_sets import get_benchmark
from clip_rc.commands.evaluate import main
from clip_rc.data import REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD, load_segmentation_dataset
from clip_rc.evaluation import METRIC_KEYS, evaluate_model, resolve_classes
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor, get_rescaled_size, resize_image_array
from clip_rc.metrics import SegmentationMetric
from clip_rc.processing_clip_rc import CLIPRCProcessor

from .colour_block_data import make_segmentation_dataset, make_voc_tree
from .conftest import tiny_config
from .local_metric import local_metric
from .random_clip import save_random_clip


REPO_ROOT = Path(__file__).resolve().parents[1]
VOC = get_benchmark("voc")
VAL_SIZES = [(48, 64), (61, 47), (64, 64), (37, 70), (61, 47)]


def save_model_folder(directory: Path, clip_dir: Path, **config_overrides) -> Path:
    """A tiny CLIP-RC initialised from the tiny CLIP (class embeddings encoded by its text tower), saved with a
    CLIP-RC processor (image processor + the CLIP tokenizer) as the training script saves it."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    config = tiny_config(**config_overrides)
    processor = CLIPRCProcessor(
        CLIPRCImageProcessor.from_model_config(config), AutoTokenizer.from_pretrained(clip_dir),
        templates=config.prompt_templates,
    )  # fmt: skip
    model = CLIPRCForSemanticSegmentation.from_clip(clip_dir, config, processor=processor)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@torch.no_grad()
def reference_label_map(model, image: Image.Image, output_size, text_embeds=None, offsets=None) -> torch.Tensor:
    """The reference test protocol written out independently of the image processor: short side to the crop (mmcv
    rounding), the reference's 0-255 normalisation, windows every `sliding_window_stride` over the image padded to
    one crop, sigmoid of the upsampled logits minus the calibration averaged where windows overlap, resized to
    `output_size`, arg-max."""
    crop, stride = model.config.crop_size, model.config.sliding_window_stride
    pixels = np.asarray(image.convert("RGB"))
    height, width = get_rescaled_size(*pixels.shape[:2], crop)
    resized = torch.from_numpy(resize_image_array(pixels, (height, width)).astype(np.float32)).permute(2, 0, 1)
    normalised = (resized - torch.tensor(REFERENCE_IMAGE_MEAN)[:, None, None]) / torch.tensor(REFERENCE_IMAGE_STD)[
        :, None, None
    ]
    canvas = torch.nn.functional.pad(normalised, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    canvas_height, canvas_width = canvas.shape[-2:]
    num_classes = model.config.num_labels if text_embeds is None else text_embeds.shape[0]
    if offsets is None:
        offsets = torch.tensor(
            [model.config.seen_score_bias if c in model.config.trained_class_ids else 0.0 for c in range(num_classes)]
        )
    scores, counts = torch.zeros(num_classes, canvas_height, canvas_width), torch.zeros(canvas_height, canvas_width)
    for row in range(max(canvas_height - crop + stride - 1, 0) // stride + 1):
        for col in range(max(canvas_width - crop + stride - 1, 0) // stride + 1):
            bottom, right = min(row * stride + crop, canvas_height), min(col * stride + crop, canvas_width)
            top, left = bottom - crop, right - crop
            logits = model(canvas[None, :, top:bottom, left:right], text_embeds=text_embeds).logits
            upsampled = torch.nn.functional.interpolate(
                logits, size=(crop, crop), mode="bilinear", align_corners=False
            )
            scores[:, top:bottom, left:right] += upsampled[0].sigmoid() - offsets[:, None, None]
            counts[top:bottom, left:right] += 1
    scores = (scores / counts)[:, :height, :width]
    scores = torch.nn.functional.interpolate(
        scores[None], size=tuple(output_size), mode="bilinear", align_corners=False
    )
    return scores[0].argmax(dim=0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread, as in the `OMP_NUM_THREADS=1` subprocesses: at class boundaries the top two scores
    cross, so a few pixels have near-ties that a different thread count (other float rounding) can flip."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("evaluation")
    clip_dir = save_random_clip(root / "clip")
    voc_model_dir = save_model_folder(
        root / "voc_model", clip_dir, id2label=VOC.id2label, seen_class_ids=list(VOC.seen_class_ids), benchmark="voc"
    )
    small_model_dir = save_model_folder(root / "small_model", clip_dir)  # 3 classes: cat, dog, grass

    devkit = make_voc_tree(root / "data", num_train=1, num_val=len(VAL_SIZES), num_aug=0, sizes=VAL_SIZES)
    voc_dir = devkit / "VOC2012"
    names = (voc_dir / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    model = CLIPRCForSemanticSegmentation.from_pretrained(voc_model_dir).eval()
    palette = Image.open(voc_dir / "SegmentationClass" / f"{names[0]}.png").getpalette()
    predictions, references = [], []
    rng = np.random.default_rng(0)
    for name in names:
        image = Image.open(voc_dir / "JPEGImages" / f"{name}.jpg").convert("RGB")
        prediction = reference_label_map(model, image, (image.height, image.width)).numpy()
        label = prediction.copy()
        height, width = label.shape
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        label[top : top + height // 3, left : left + width // 3] = rng.integers(0, 20)  # disagreements
        label[:2] = 255  # ignored rows
        stored = np.where(label == 255, 255, label + 1).astype(np.uint8)
        stored[-1, : width // 2] = 0  # VOC background: dropped to ignore by the loader
        label[-1, : width // 2] = 255
        label_image = Image.fromarray(stored)
        label_image.putpalette(palette)
        label_image.save(voc_dir / "SegmentationClass" / f"{name}.png")
        predictions.append(prediction)
        references.append(label)

    metric = SegmentationMetric(20, seen_class_ids=VOC.seen_class_ids, class_names=VOC.class_names)
    for prediction, reference in zip(predictions, references):
        metric.update(prediction, reference)
    return {
        "root": root,
        "clip_dir": clip_dir,
        "voc_model_dir": voc_model_dir,
        "small_model_dir": small_model_dir,
        "devkit": devkit,
        "predictions": predictions,
        "references": references,
        "expected": metric.compute(),
        "sizes": [prediction.shape for prediction in predictions],  # (height, width), odd ones included
    }


def assert_matches(record: dict, expected: dict, atol: float = 1e-9):
    """metrics.json values (NaN written as null) equal the independent figures."""
    for key in METRIC_KEYS:
        ours = np.asarray([np.nan if value is None else value for value in np.atleast_1d(record[key])], dtype=float)
        theirs = np.atleast_1d(np.asarray(expected[key], dtype=float))
        np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0, equal_nan=True, err_msg=key)


def eval_args(assets, output_dir, *extra, model="voc_model_dir"):
    return ["--model", str(assets[model]), "--data_root", str(assets["devkit"]), "--output_dir", str(output_dir),
            "--no_progress", *extra]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], num_processes: int, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N eval.py ...` in a subprocess, on CPU.

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (unless mpirun is used);
    `--multi_gpu` starts N through torch.distributed.run and eval.py runs them as a gloo group when there is no GPU.
    """
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(REPO_ROOT / "eval.py"), *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


# ---- end to end --------------------------------------------------------------------------------------------------


def test_eval_one_process_matches_an_independent_computation(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert main(eval_args(assets, output_dir, "--batch_size", "3", "--save_overlays", "2")) == 0
    record = json.loads((output_dir / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(record)
    assert_matches(record, assets["expected"])
    assert record["class_names"] == list(VOC.class_names)
    assert record["num_images"] == len(VAL_SIZES)
    assert record["unseen_class_ids"] == list(VOC.unseen_class_ids)
    # The labels are the model's predictions, perturbed: the figures are far from trivial.
    assert 0.5 < record["overall_accuracy"] < 1.0
    assert any(value is not None and 0.3 < value < 1.0 for value in record["per_category_iou"])
    assert "mIoU" in capsys.readouterr().out  # the per-class table on the terminal
    overlays = sorted((output_dir / "overlays").iterdir())
    assert [path.name for path in overlays] == ["00000.png", "00001.png"]
    for path, (height, width) in zip(overlays, assets["sizes"]):
        assert Image.open(path).size == (width, height)


@pytest.mark.slow
def test_eval_two_processes_give_the_same_numbers_and_cross_check(assets, tmp_path):
    metric_path = local_metric(tmp_path, "confusion_iou")
    output_dir = tmp_path / "out"
    result = launch(eval_args(assets, output_dir, "--cross_check_evaluate", "--evaluate_metric_path", metric_path),
                    num_processes=2, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((output_dir / "metrics.json").read_text())
    assert_matches(record, assets["expected"])
    assert record["num_images"] == len(VAL_SIZES) and record["cross_checked_with_evaluate"]
    assert "2 process(es)" in result.stderr, result.stderr


@pytest.mark.slow
def test_failed_cross_check_exits_non_zero_in_two_processes_and_keeps_metrics_json(assets, tmp_path):
    """Every process fails (none hangs waiting for the main process) and metrics.json is kept."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    previous = '{"mean_iou": 0.123}\n'
    (output_dir / "metrics.json").write_text(previous)
    wrong = local_metric(tmp_path, "wrong_iou", tamper="* 0.5")
    result = launch(eval_args(assets, output_dir, "--cross_check_evaluate", "--evaluate_metric_path", wrong),
                    num_processes=2, cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert "mean_iou:" in result.stderr and "per_category_iou:" in result.stderr
    assert (output_dir / "metrics.json").read_text() == previous
    assert sorted(path.name for path in output_dir.iterdir()) == ["metrics.json"]  # no temporary file left


def test_cross_check_passes_and_evaluate_backend_gives_the_same_file(assets, tmp_path):
    metric_path = local_metric(tmp_path, "confusion_iou")
    assert (
        main(eval_args(assets, tmp_path / "a", "--cross_check_evaluate", "--evaluate_metric_path", metric_path)) == 0
    )
    assert_matches(json.loads((tmp_path / "a" / "metrics.json").read_text()), assets["expected"])
    assert main(eval_args(assets, tmp_path / "b", "--metric_backend", "evaluate", "--evaluate_metric_path",
                          metric_path)) == 0  # fmt: skip
    record = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert record["metric_backend"] == "evaluate"
    assert_matches(record, assets["expected"])


def test_failed_cross_check_exits_loudly_in_process(assets, tmp_path, caplog):
    output_dir = tmp_path / "out"
    assert main(eval_args(assets, output_dir)) == 0
    good = (output_dir / "metrics.json").read_bytes()
    wrong = local_metric(tmp_path, "wrong_accuracy_iou", tamper="+ 0.01")
    assert main(eval_args(assets, output_dir, "--cross_check_evaluate", "--evaluate_metric_path", wrong)) == 1
    message = caplog.text
    assert "mean_iou:" in message and "per_category_iou:" in message and "metrics.json not written" in message
    assert "overall_accuracy:" not in message  # only the keys that differ are named
    assert (output_dir / "metrics.json").read_bytes() == good


def test_cross_dataset_class_names(assets, tmp_path, caplog):
    """A 3-class model scored on VOC with VOC's class names, encoded by its text tower with its templates."""
    assert main(eval_args(assets, tmp_path / "mismatch", model="small_model_dir")) == 1
    assert "--class_names_from" in caplog.text

    assert main(eval_args(assets, tmp_path / "out", "--class_names_from", "voc", model="small_model_dir")) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["class_names"] == list(VOC.class_names)
    assert record["seen_class_ids"] == list(VOC.seen_class_ids)
    assert record["unseen_class_ids"] == list(VOC.unseen_class_ids)

    from transformers import AutoTokenizer

    model = CLIPRCForSemanticSegmentation.from_pretrained(assets["small_model_dir"]).eval()
    assert model.config.num_labels == 3
    tokenizer = AutoTokenizer.from_pretrained(assets["small_model_dir"])
    prompts = tokenizer([template.format(name) for name in VOC.class_names for template in model.config.prompt_templates],
                        padding=True, return_tensors="pt")  # fmt: skip
    text_embeds = model.clip_rc.encode_class_prompts(prompts["input_ids"], prompts["attention_mask"])
    split = load_segmentation_dataset(assets["devkit"], splits="val")["val"]
    metric = SegmentationMetric(20, seen_class_ids=VOC.seen_class_ids)
    for index in range(len(split)):
        label = np.asarray(split[index]["label"])
        prediction = reference_label_map(model, split[index]["image"], label.shape, text_embeds, torch.zeros(20))
        metric.update(prediction, label)
    assert_matches(record, metric.compute())


def test_cross_dataset_ade20k_150(assets, tmp_path, caplog):
    """A (tiny) COCO-Stuff model scored on an ADE20K tree with ADE20K-150's class names, encoded with its 15 templates,
    as for PASCAL Context. The tree's label maps are the model's own predictions (stored as train id + 1, with an
    "other objects" block of 0 and a block of wrong ids), so that the figures are far from trivial."""
    from transformers import AutoTokenizer

    from .test_data import make_ade20k_tree

    coco, ade = get_benchmark("coco-stuff"), get_benchmark("ade20k-150")
    model_dir = save_model_folder(
        tmp_path / "coco_model", assets["clip_dir"], id2label=coco.id2label, seen_class_ids=list(coco.seen_class_ids),
        benchmark="coco-stuff", prompt_templates=list(coco.templates),
    )  # fmt: skip
    model = CLIPRCForSemanticSegmentation.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = tokenizer([template.format(name) for name in ade.class_names for template in coco.templates],
                        padding=True, return_tensors="pt")  # fmt: skip
    shape = (150, len(coco.templates), -1)
    input_ids, attention_mask = prompts["input_ids"].view(shape), prompts["attention_mask"].view(shape)
    text_embeds = model.clip_rc.encode_class_prompts(input_ids, attention_mask)
    ade_root = make_ade20k_tree(tmp_path / "ade", sizes=((40, 56), (64, 48)))
    metric = SegmentationMetric(150, seen_class_ids=range(150))
    for label_path in sorted((ade_root / "annotations" / "validation").iterdir()):
        image = Image.open(ade_root / "images" / "validation" / f"{label_path.stem}.jpg").convert("RGB")
        prediction = reference_label_map(model, image, (image.height, image.width), text_embeds, torch.zeros(150))
        label = prediction.numpy().copy()
        label[: image.height // 4, : image.width // 3] = 255  # other objects, stored as 0
        label[-image.height // 4 :, -image.width // 3 :] = (label[-image.height // 4 :, -image.width // 3 :] + 7) % 150
        Image.fromarray(np.where(label == 255, 0, label + 1).astype(np.uint8)).save(label_path)
        metric.update(prediction, label)
    expected = metric.compute()
    assert 0.5 < expected["overall_accuracy"] < 1.0

    arguments = ["--model", str(model_dir), "--data_root", str(ade_root), "--no_progress"]
    assert main(arguments + ["--output_dir", str(tmp_path / "mismatch")]) == 1
    assert "hold 150 classes but 171 classes are scored" in caplog.text and "--class_names_from" in caplog.text
    assert main(arguments + ["--output_dir", str(tmp_path / "out"), "--class_names_from", "ade20k-150"]) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["class_names"] == list(ade.class_names) and record["split"] == "val" and record["num_images"] == 2
    assert record["seen_class_ids"] == list(range(150)) and record["unseen_class_ids"] == []  # no published split
    assert record["class_names_source"] == "--class_names_from ade20k-150"
    assert_matches(record, expected)


def test_a_saved_dataset_with_the_models_own_classes(assets, tmp_path):
    dataset_dir = make_segmentation_dataset(tmp_path / "dataset", num_train=1, num_validation=3, size=(45, 71))
    assert main(["--model", str(assets["small_model_dir"]), "--dataset", str(dataset_dir), "--output_dir",
                 str(tmp_path / "out"), "--no_progress"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["split"] == "validation" and record["num_images"] == 3
    assert record["class_names"] == ["cat", "dog", "grass"]
    assert record["seen_class_ids"] == [0, 1] and record["unseen_class_ids"] == [2]


# ---- evaluate_model, the function the training loop calls --------------------------------------------------------


def test_evaluate_model_restores_the_mode_and_honours_max_samples(assets):
    model = CLIPRCForSemanticSegmentation.from_pretrained(assets["voc_model_dir"]).train()
    split = load_segmentation_dataset(assets["devkit"], splits="val")["val"]
    results = evaluate_model(model, split, batch_size=2, progress=False)
    assert model.training  # the previous mode is restored
    for key in ("mean_iou", "overall_accuracy", "harmonic_iou"):
        assert results[key] == pytest.approx(assets["expected"][key], abs=1e-12)
    np.testing.assert_allclose(results["per_category_iou"], assets["expected"]["per_category_iou"], equal_nan=True)

    again = evaluate_model(model, split, max_samples=2, batch_size=2, progress=False)
    assert again["num_images"] == 2
    metric = SegmentationMetric(20, seen_class_ids=VOC.seen_class_ids)
    for prediction, reference in zip(assets["predictions"][:2], assets["references"][:2]):
        metric.update(prediction, reference)
    assert again["mean_iou"] == pytest.approx(metric.compute()["mean_iou"], abs=1e-12)


def test_classes_default_to_the_models_own_with_calibration(assets):
    model = CLIPRCForSemanticSegmentation.from_pretrained(assets["voc_model_dir"]).eval()
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    classes = resolve_classes(model, image_processor)
    assert classes.text_embeds is None and classes.names == list(VOC.class_names)
    assert classes.seen_class_ids == list(VOC.seen_class_ids)
    same_names = resolve_classes(model, image_processor, class_names=list(VOC.class_names))
    assert same_names.text_embeds is None


# ---- command line and file helpers --------------------------------------------------------------------------------


def test_plot_and_its_optional_dependency(assets, tmp_path, monkeypatch):
    if _has_matplotlib():
        assert main(eval_args(assets, tmp_path / "plotted", "--plot", "--max_samples", "1")) == 0
        assert Image.open(tmp_path / "plotted" / "per_class_iou.png").size[0] > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    with pytest.raises(SystemExit) as raised:
        main(eval_args(assets, tmp_path / "no_plot", "--plot"))
    assert raised.value.code == 2
    assert not (tmp_path / "no_plot").exists()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_argument_errors(assets, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", str(assets["voc_model_dir"]), "--output_dir", str(tmp_path)])  # no data source
    with pytest.raises(SystemExit):
        main(eval_args(assets, tmp_path, "--metric_backend", "sklearn"))
