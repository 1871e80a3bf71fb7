"""Inference refuses what would give a silently wrong result, naming the file, tensor or value (issue 13)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_rc.commands.evaluate import main as eval_main
from clip_rc.commands.predict import main as predict_main

from .colour_block_data import make_segmentation_dataset
from .conftest import tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def broken_copy(model_folder, tmp_path, edit) -> str:
    """A copy of the model folder whose weights `edit` changed (a state dict in, a state dict out)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for path in [model_folder / "config.json", *model_folder.glob("*.py")]:
        (folder / path.name).write_bytes(path.read_bytes())
    save_file(
        edit(load_file(model_folder / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"}
    )
    return str(folder)


def predict(model, image_path, tmp_path, *extra) -> int:
    return predict_main(["--model", str(model), str(image_path), "--output_dir", str(tmp_path / "out"), *extra])


def test_a_missing_weight_is_refused_unless_allowed(model_folder, image_path, tmp_path, caplog):
    folder = broken_copy(
        model_folder, tmp_path, lambda state: {k: v for k, v in state.items() if k != "decode_head.q_proj.weight"}
    )
    assert predict(folder, image_path, tmp_path) == 1
    assert "decode_head.q_proj.weight" in caplog.text and "--allow_missing_weights" in caplog.text
    assert not (tmp_path / "out").exists()
    assert predict(folder, image_path, tmp_path, "--allow_missing_weights") == 0


def test_non_finite_weights_are_refused_naming_the_tensor(model_folder, image_path, tmp_path, caplog):
    def poison(state):
        state["decode_head.lateral_proj.bias"][3] = float("nan")
        return state

    folder = broken_copy(model_folder, tmp_path, poison)
    assert predict(folder, image_path, tmp_path) == 1
    assert "non-finite" in caplog.text and "decode_head.lateral_proj.bias" in caplog.text


def test_broken_folders_are_named(model_folder, image_path, tmp_path, caplog):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((model_folder / "model.safetensors").read_bytes()[:1000])
    assert predict(truncated, image_path, tmp_path) == 1
    assert str(truncated / "model.safetensors") in caplog.text
    empty = tmp_path / "no_config"
    empty.mkdir()
    dataset = make_segmentation_dataset(tmp_path / "data", num_train=1, num_validation=1)
    assert eval_main(["--model", str(empty), "--dataset", str(dataset), "--output_dir", str(tmp_path / "eval")]) == 1
    assert f"{empty} holds no config.json" in caplog.text


def test_a_decompression_bomb_is_named_and_the_others_are_written(
    model_folder, image_path, tmp_path, caplog, monkeypatch
):
    bomb = tmp_path / "bomb.png"
    PIL.Image.new("L", (300, 300)).save(bomb)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 20_000)  # 90,000 pixels is then over twice the limit
    status = predict_main(
        ["--model", str(model_folder), str(bomb), str(image_path), "--output_dir", str(tmp_path / "out")]
    )
    assert status == 1 and str(bomb) in caplog.text
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["photo_labels.png", "photo_overlay.png"]


def test_class_names_given_with_embeddings_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="repeat"):
        model.set_class_embeddings(torch.randn(2, 24), class_names=["cat", "cat"])
    with pytest.raises(ValueError, match="non-finite"):
        model.set_class_embeddings(torch.full((3, 24), float("nan")))
    assert json.loads(model.config.to_json_string())["id2label"] == {"0": "cat", "1": "dog", "2": "grass"}
