import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor

from clip_rc.data import REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD, SegmentationEvalTransform
from clip_rc.processing_clip_rc import CLIPRCImageProcessor, CLIPRCProcessor, get_rescaled_size
from tests.tiny_tokenizer import EOS_TOKEN, build_tiny_clip_tokenizer


@pytest.fixture
def image_processor():
    return CLIPRCImageProcessor()


@pytest.fixture
def processor(image_processor):
    templates = ["a photo of a {}.", "a {} in the scene."]
    return CLIPRCProcessor(image_processor, build_tiny_clip_tokenizer(), templates=templates)


def test_defaults(image_processor):
    assert image_processor.model_input_names == ["pixel_values"]
    assert dict(image_processor.size) == {"shortest_edge": 512}
    assert dict(image_processor.crop_size) == {"height": 512, "width": 512}
    assert image_processor.do_rescale and image_processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(image_processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(image_processor.image_std) == (0.229, 0.224, 0.225)
    assert image_processor.resample == PIL.Image.Resampling.BILINEAR


def test_rescaled_size_uses_mmcv_rounding():
    assert get_rescaled_size(333, 500, 512) == (512, 769)
    assert get_rescaled_size(500, 333, 512) == (769, 512)
    assert get_rescaled_size(100, 1000, 512, longest_edge=2048) == (205, 2048)


def test_mixed_inputs_give_a_list_and_original_sizes(image_processor):
    images = [
        PIL.Image.new("RGB", (100, 50), (255, 0, 0)),  # width x height
        np.zeros((40, 60), np.uint8),  # grayscale HW
        torch.zeros(3, 30, 30, dtype=torch.uint8),  # CHW tensor
        torch.zeros(25, 20, 3, dtype=torch.uint8),  # HWC tensor
        np.zeros((20, 10, 3), np.uint8),  # HWC array
        PIL.Image.new("RGBA", (10, 10)),
        PIL.Image.new("P", (8, 16)),
        PIL.Image.new("L", (12, 6)),
    ]
    output = image_processor(images, return_tensors="pt")
    shapes = [tuple(pixels.shape) for pixels in output["pixel_values"]]
    assert shapes == [
        (3, 512, 1024), (3, 512, 768), (3, 512, 512), (3, 640, 512), (3, 1024, 512), (3, 512, 512),
        (3, 1024, 512), (3, 512, 1024),
    ]  # fmt: skip
    assert all(isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float32 for pixels in output["pixel_values"])
    assert output["original_sizes"].tolist() == [
        [50, 100], [40, 60], [30, 30], [25, 20], [20, 10], [10, 10], [16, 8], [6, 12]
    ]
    # Red, normalised with ImageNet statistics.
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(output["pixel_values"][0][:, 100, 200], red, atol=1e-5)


def test_equal_sizes_are_stacked(image_processor):
    images = [PIL.Image.new("RGB", (64, 32), colour) for colour in ((0, 0, 0), (255, 255, 255))]
    output = image_processor(images, return_tensors="pt")
    assert output["pixel_values"].shape == (2, 3, 512, 1024)
    assert output["original_sizes"].tolist() == [[32, 64], [32, 64]]
    unbatched = image_processor(images[0])
    assert isinstance(unbatched["pixel_values"], list) and unbatched["pixel_values"][0].shape == (3, 512, 1024)
    assert unbatched["original_sizes"] == [(32, 64)]


def test_matches_the_reference_evaluation_transform(image_processor):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    processed = image_processor(PIL.Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    reference = SegmentationEvalTransform()({"image": [pixels], "label": [np.zeros((37, 53), np.uint8)]})
    assert processed.shape == reference["pixel_values"][0].shape == (3, 512, 733)
    # Same resize; ImageNet statistics on [0, 1] equal the reference's on 0-255.
    assert torch.allclose(processed, reference["pixel_values"][0], atol=1e-4)
    assert np.allclose(np.array(REFERENCE_IMAGE_MEAN) / 255, image_processor.image_mean)
    assert np.allclose(np.array(REFERENCE_IMAGE_STD) / 255, image_processor.image_std)


def test_post_process_semantic_segmentation(image_processor):
    logits = torch.full((2, 3, 4, 4), -5.0)
    logits[0, 1] = 5.0
    logits[1, 2, :, :2] = 5.0
    outputs = SimpleNamespace(logits=logits)
    maps = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[(10, 12), (7, 5)])
    assert [tuple(segmentation.shape) for segmentation in maps] == [(10, 12), (7, 5)]
    assert all(segmentation.dtype == torch.int64 for segmentation in maps)
    assert (maps[0] == 1).all()
    assert (maps[1][:, 0] == 2).all() and (maps[1][:, -1] == 0).all()

    no_resize = image_processor.post_process_semantic_segmentation(outputs)
    assert [tuple(segmentation.shape) for segmentation in no_resize] == [(4, 4), (4, 4)]

    # Offsets are subtracted from the sigmoid scores: a large offset on class 1 hands image 0 to class 0.
    offset = image_processor.post_process_semantic_segmentation(
        outputs, target_sizes=torch.tensor([[4, 4], [4, 4]]), score_offsets=torch.tensor([0.0, 1.0, 0.0])
    )
    assert (offset[0] == 0).all()

    with pytest.raises(ValueError, match="target sizes"):
        image_processor.post_process_semantic_segmentation(outputs, target_sizes=[(4, 4)])
    with pytest.raises(ValueError, match="score_offsets"):
        image_processor.post_process_semantic_segmentation(outputs, score_offsets=torch.zeros(2))


def test_post_process_returns_original_sizes(image_processor):
    images = [PIL.Image.new("RGB", (45, 30)), PIL.Image.new("RGB", (20, 40))]
    inputs = image_processor(images, return_tensors="pt")
    logits = torch.randn(2, 5, 32, 32)
    maps = image_processor.post_process_semantic_segmentation(
        SimpleNamespace(logits=logits), target_sizes=inputs["original_sizes"]
    )
    assert [tuple(segmentation.shape) for segmentation in maps] == [(30, 45), (40, 20)]


def test_image_processor_round_trip(tmp_path, image_processor):
    custom = CLIPRCImageProcessor(size={"shortest_edge": 256})
    custom.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "processing_clip_rc.CLIPRCImageProcessor"
    assert (tmp_path / "processing_clip_rc.py").is_file()
    reloaded = CLIPRCImageProcessor.from_pretrained(tmp_path)
    assert dict(reloaded.size) == {"shortest_edge": 256}
    auto = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "CLIPRCImageProcessor"
    image = PIL.Image.new("RGB", (40, 20), (10, 20, 30))
    expected = custom(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(auto(image, return_tensors="pt")["pixel_values"], expected)


def test_text_prompts_shape_padding_and_eot(processor):
    tokenizer = processor.tokenizer
    output = processor(text=["cat", "pottedplant", "sky"], return_tensors="pt")
    assert set(output) == {"input_ids", "attention_mask"}
    assert output["input_ids"].shape == (3, 2, 32) and output["attention_mask"].shape == (3, 2, 32)
    expected = tokenizer(["a photo of a pottedplant.", "a pottedplant in the scene."])["input_ids"]
    for template_index, ids in enumerate(expected):
        row = output["input_ids"][1, template_index]
        assert row[: len(ids)].tolist() == ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # Padding follows the end-of-text token, which stays right after the prompt.
        assert (row[len(ids) :] == tokenizer.pad_token_id).all()
        assert output["attention_mask"][1, template_index].tolist() == [1] * len(ids) + [0] * (32 - len(ids))
    assert tokenizer.convert_ids_to_tokens(int(output["input_ids"][0, 0, 7])) == EOS_TOKEN

    longest = processor(text=["cat"], templates=["{}"], padding="longest", return_tensors="pt")
    assert longest["input_ids"].shape == (1, 1, 3)
    lists = processor(text="dog")
    assert np.array(lists["input_ids"]).shape == (1, 2, 32)
    with pytest.raises(ValueError, match="slot"):
        processor(text=["cat"], templates=["no slot"])
    with pytest.raises(ValueError, match="Pass images, text"):
        processor()


def test_default_templates(image_processor):
    processor = CLIPRCProcessor(image_processor, build_tiny_clip_tokenizer())
    assert processor.templates == ("a photo of a {}",)
    assert processor(text=["cat", "dog"], return_tensors="pt")["input_ids"].shape == (2, 1, 32)


def test_processor_images_and_text(processor):
    images = [PIL.Image.new("RGB", (64, 32)), PIL.Image.new("RGB", (32, 64))]
    output = processor(images=images, text=["cat", "dog"], return_tensors="pt")
    assert isinstance(output["pixel_values"], list) and len(output["pixel_values"]) == 2
    assert output["original_sizes"].tolist() == [[32, 64], [64, 32]]
    assert output["input_ids"].shape == (2, 2, 32)
    images_only = processor(images=images[0], return_tensors="pt", size={"shortest_edge": 64})
    assert images_only["pixel_values"].shape == (1, 3, 64, 128) and "input_ids" not in images_only


def test_processor_round_trip_with_auto_processor(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["templates"] == ["a photo of a {}.", "a {} in the scene."]
    assert config["auto_map"]["AutoProcessor"] == "processing_clip_rc.CLIPRCProcessor"
    assert (tmp_path / "processing_clip_rc.py").is_file()

    reloaded = CLIPRCProcessor.from_pretrained(tmp_path)
    auto = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "CLIPRCProcessor" and type(auto.image_processor).__name__ == "CLIPRCImageProcessor"
    image = PIL.Image.new("RGB", (48, 24), (200, 100, 0))
    expected = processor(images=image, text=["cat", "sky"], return_tensors="pt")
    for loaded in (reloaded, auto):
        assert loaded.templates == processor.templates
        output = loaded(images=image, text=["cat", "sky"], return_tensors="pt")
        for key in ("pixel_values", "original_sizes", "input_ids", "attention_mask"):
            assert torch.equal(output[key], expected[key]), key
