"""`clip-rc-export` (torch.export and ONNX through `transformers.exporters`) and the ONNX Runtime path, on a tiny saved
model: exported logits and class embeddings equal eager, ONNX Runtime label maps equal PyTorch's, `clip-rc-predict
--backend onnxruntime`, sizes the graphs cannot take, and the atomic output folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clip_rc.commands import export as export_module
from clip_rc.commands.export import main
from clip_rc.commands.predict import main as predict_main
from clip_rc.exported_model import load_exported_model_and_processor
from clip_rc.inference import encode_class_names, load_model_and_processor, segment_images

from .random_clip import save_random_clip
from .test_evaluation import save_model_folder
from .test_readme import python_examples


# Every test here runs exports / installed commands in subprocesses: seconds each.
pytestmark = pytest.mark.slow


REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["torch", "onnx"]
# (height, width) of the crops: the training crop, one not square, one larger than the crop.
CROP_SIZES = [(64, 64), (48, 80), (96, 160)]
IMAGE_SIZES = [(61, 47), (90, 130), (64, 64), (37, 70)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return save_model_folder(root / "model", save_random_clip(root / "clip"))  # classes cat, dog, grass


@pytest.fixture(scope="module")
def export_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    for export_format in FORMATS:
        assert (
            main(["--model", str(model_dir), "--format", export_format, "--output_dir", str(root / export_format)])
            == 0
        )
    return {export_format: root / export_format for export_format in FORMATS}


@pytest.fixture(scope="module")
def eager(model_dir):
    return load_model_and_processor(model_dir)


@pytest.fixture(scope="module")
def exported(export_dirs):
    # A torch.export program is pickled: loading it is trusting it (we wrote it).
    return {
        export_format: load_exported_model_and_processor(
            export_dirs[export_format], trust_remote_code=export_format == "torch"
        )
        for export_format in FORMATS
    }


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for height, width in IMAGE_SIZES]


def test_the_folder_holds_both_graphs_the_processor_config_and_the_checkpoint_classes(export_dirs, eager):
    model = eager[0]
    names = {path.name for path in export_dirs["onnx"].iterdir()}
    assert {
        "model.onnx",
        "model.onnx.data",
        "text_model.onnx",
        "text_model.onnx.data",
        "export.json",
        "config.json",
    } <= names
    assert {"processor_config.json", "tokenizer.json", "class_embeddings.safetensors"} <= names
    assert {"model.pt2", "text_model.pt2"} <= {path.name for path in export_dirs["torch"].iterdir()}
    manifest = json.loads((export_dirs["onnx"] / "export.json").read_text())
    assert manifest["export_format"] == "onnx" and set(manifest["components"]) == {"model", "text_model"}
    classes = load_file(export_dirs["onnx"] / "class_embeddings.safetensors")
    torch.testing.assert_close(classes["class_embeddings"], model.class_embeddings, rtol=0, atol=0)
    with torch.no_grad():
        offsets = model(pixel_values=torch.zeros(1, 3, 64, 64)).score_offsets
    torch.testing.assert_close(classes["score_offsets"], offsets, rtol=0, atol=0)
    assert classes["score_offsets"].abs().sum() > 0  # the seen classes' calibration travels with the export


@pytest.mark.parametrize("export_format", FORMATS)
def test_exported_logits_equal_eager_at_any_image_size(exported, eager, export_format):
    model, exported_model = eager[0], exported[export_format][0]
    generator = torch.Generator().manual_seed(0)
    new_classes = torch.nn.functional.normalize(
        torch.randn(5, model.config.projection_dim, generator=generator), dim=-1
    )
    for num_crops, (height, width) in enumerate(CROP_SIZES, start=1):
        pixel_values = torch.randn(num_crops, 3, height, width, generator=generator)
        with torch.no_grad():
            reference = model(pixel_values=pixel_values)
            with_new_classes = model(pixel_values=pixel_values, text_embeds=new_classes).logits
        outputs = exported_model(pixel_values=pixel_values)
        assert outputs.logits.shape == (num_crops, 3, height // 8, width // 8)
        torch.testing.assert_close(outputs.logits, reference.logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(outputs.score_offsets, reference.score_offsets, rtol=0, atol=0)
        torch.testing.assert_close(
            exported_model(pixel_values=pixel_values, text_embeds=new_classes).logits,
            with_new_classes,
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.parametrize("export_format", FORMATS)
def test_sizes_the_model_cannot_take_are_refused_naming_the_size_and_the_multiple(exported, export_format):
    exported_model = exported[export_format][0]
    with pytest.raises(ValueError, match=r"64x72: .*multiples of 16 \(patch_size 8 x region_grid_size 2\)"):
        exported_model(pixel_values=torch.zeros(1, 3, 64, 72))
    with pytest.raises(ValueError, match=r"\(num_crops, 3, height, width\), got \(3, 64, 64\)"):
        exported_model(pixel_values=torch.zeros(3, 64, 64))


@pytest.mark.parametrize("export_format", FORMATS)
def test_the_exported_text_tower_encodes_class_names_as_eager(exported, eager, export_format):
    model, image_processor, tokenizer = eager
    exported_model, exported_processor, exported_tokenizer = exported[export_format]
    for names, templates in [
        (["sky"], None),
        (["sky", "tree", "car", "person"], ["a photo of a {}", "a {} in the scene", "{}"]),
    ]:
        expected = encode_class_names(model, image_processor, tokenizer, names, templates)
        encoded = encode_class_names(exported_model, exported_processor, exported_tokenizer, names, templates)
        assert encoded.shape == (len(names), model.config.projection_dim)
        torch.testing.assert_close(encoded, expected, rtol=0, atol=1e-4)


def test_onnxruntime_label_maps_equal_pytorch_on_mixed_size_images(exported, eager, images):
    model, image_processor, tokenizer = eager
    onnx_model, onnx_processor, onnx_tokenizer = exported["onnx"]
    expected = segment_images(model, image_processor, images)
    label_maps = segment_images(onnx_model, onnx_processor, images)
    assert [tuple(label_map.shape) for label_map in label_maps] == IMAGE_SIZES
    for label_map, reference in zip(label_maps, expected):
        assert torch.equal(label_map, reference)

    # Class names given at run time, encoded by each backend's text tower (no calibration): several classes win.
    names = ["sky", "tree", "car", "person"]
    text_embeds = encode_class_names(model, image_processor, tokenizer, names)
    expected = segment_images(model, image_processor, images, text_embeds=text_embeds)
    onnx_embeds = encode_class_names(onnx_model, onnx_processor, onnx_tokenizer, names)
    label_maps = segment_images(onnx_model, onnx_processor, images, text_embeds=onnx_embeds)
    for label_map, reference in zip(label_maps, expected):
        assert torch.equal(label_map, reference)
    assert len(set(torch.cat([label_map.flatten() for label_map in label_maps]).tolist())) > 1


def test_predict_with_the_onnxruntime_backend_writes_the_pytorch_label_maps(
    model_dir, export_dirs, images, tmp_path, caplog
):
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    for classes in ([], ["--classes", "sky,tree,car"]):
        runs = {
            "pytorch": ["--model", str(model_dir)],
            "onnxruntime": ["--model", str(export_dirs["onnx"]), "--backend", "onnxruntime"],
        }
        for backend, arguments in runs.items():
            assert (
                predict_main([*paths, *arguments, *classes, "--output_dir", str(tmp_path / backend), "--overwrite"])
                == 0
            )
        for index in range(len(images)):
            pytorch = np.asarray(Image.open(tmp_path / "pytorch" / f"image{index}_labels.png"))
            onnxruntime = np.asarray(Image.open(tmp_path / "onnxruntime" / f"image{index}_labels.png"))
            assert np.array_equal(onnxruntime, pytorch)
    wrong_format = [
        paths[0],
        "--model",
        str(export_dirs["torch"]),
        "--backend",
        "onnxruntime",
        "--output_dir",
        str(tmp_path / "x"),
    ]
    assert predict_main(wrong_format) == 1
    assert re.search("holds a dynamo export, not onnx: .*--format onnx", caplog.text)


def test_the_output_folder_is_refused_when_not_empty_and_replaced_whole(model_dir, tmp_path, monkeypatch):
    output_dir = tmp_path / "exported"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("earlier export")
    arguments = ["--model", str(model_dir), "--format", "torch", "--output_dir", str(output_dir)]
    assert main(arguments) == 1
    assert [path.name for path in output_dir.iterdir()] == ["keep.txt"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Failing after the graphs and the processor were written: the earlier folder stays as it was, nothing is left.
    monkeypatch.setattr(export_module, "save_file", fail)
    assert main([*arguments, "--overwrite"]) == 1
    assert [path.name for path in output_dir.iterdir()] == ["keep.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["exported"]
    monkeypatch.undo()

    assert main([*arguments, "--overwrite"]) == 0
    names = {path.name for path in output_dir.iterdir()}
    assert "keep.txt" not in names and {"model.pt2", "text_model.pt2", "class_embeddings.safetensors"} <= names
    assert [path.name for path in tmp_path.iterdir()] == ["exported"]


def test_the_readme_deploy_example_runs_as_written(export_dirs, images, tmp_path):
    (code,) = python_examples("Deploy")
    photo = tmp_path / "photo.jpg"
    images[1].save(photo)
    code = code.replace('"exported/voc-inductive-onnx"', repr(str(export_dirs["onnx"]))).replace(
        '"photo.jpg"', repr(str(photo))
    )
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("torch.Size([90, 130]) [")
