import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor

from clip_rc.data import REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor, get_rescaled_size, sliding_windows
from clip_rc.processing_clip_rc import CLIPRCProcessor
from clip_rc.toy.tiny_clip import EOS_TOKEN
from tests.random_clip import build_test_tokenizer


@pytest.fixture
def image_processor():
    return CLIPRCImageProcessor()


@pytest.fixture
def small_processor():
    """64-pixel windows every 48 pixels after resizing the short side to 64."""
    return CLIPRCImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, sliding_window_stride=48
    )


@pytest.fixture
def processor(image_processor):
    templates = ["a photo of a {}.", "a {} in the scene."]
    return CLIPRCProcessor(image_processor, build_test_tokenizer(), templates=templates)


def test_defaults(image_processor):
    assert image_processor.model_input_names == ["pixel_values", "image_sizes"]
    assert dict(image_processor.size) == {"shortest_edge": 512}
    assert dict(image_processor.crop_size) == {"height": 512, "width": 512}
    assert image_processor.do_sliding_window and image_processor.sliding_window_stride == 426
    assert image_processor.do_rescale and image_processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(image_processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(image_processor.image_std) == (0.229, 0.224, 0.225)
    assert image_processor.resample == PIL.Image.Resampling.BILINEAR
    # ImageNet statistics on [0, 1] are the reference's on 0-255.
    assert np.allclose(np.array(REFERENCE_IMAGE_MEAN) / 255, image_processor.image_mean)
    assert np.allclose(np.array(REFERENCE_IMAGE_STD) / 255, image_processor.image_std)


def test_rescaled_size_uses_mmcv_rounding():
    assert get_rescaled_size(333, 500, 512) == (512, 769)
    assert get_rescaled_size(500, 333, 512) == (769, 512)
    assert get_rescaled_size(100, 1000, 512, longest_edge=2048) == (205, 2048)


def test_inputs_of_every_kind_resize_and_cut_into_windows(image_processor):
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
    sizes = [[512, 1024], [512, 768], [512, 512], [640, 512], [1024, 512], [512, 512], [1024, 512], [512, 1024]]
    assert output["image_sizes"].tolist() == sizes
    assert image_processor.windows_per_image(sizes) == [3, 2, 1, 2, 3, 1, 3, 3]
    assert output["pixel_values"].shape == (18, 3, 512, 512) and output["pixel_values"].dtype == torch.float32
    # Red, normalised with ImageNet statistics, in the first window of the first image.
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(output["pixel_values"][0][:, 100, 200], red, atol=1e-5)


def test_windows_are_the_resized_image_cut_like_the_reference(small_processor):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    whole = small_processor(PIL.Image.fromarray(pixels), do_sliding_window=False, return_tensors="pt")
    assert whole["pixel_values"].shape == (1, 3, 64, 92) and whole["image_sizes"].tolist() == [[64, 92]]
    windows = small_processor(PIL.Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    expected = [
        whole["pixel_values"][0, :, top:bottom, left:right]
        for top, bottom, left, right in sliding_windows(64, 92, 64, 48)
    ]
    assert torch.equal(windows, torch.stack(expected))
    # The reference normalises 0-255 pixels with its own statistics: the same numbers.
    resized = torch.from_numpy(
        np.asarray(PIL.Image.fromarray(pixels).resize((92, 64), PIL.Image.BILINEAR)).astype(np.float32)
    )
    assert resized.shape == (64, 92, 3)
    white = (255 - torch.tensor(REFERENCE_IMAGE_MEAN)) / torch.tensor(REFERENCE_IMAGE_STD)
    white_output = small_processor(PIL.Image.new("RGB", (64, 64), (255, 255, 255)), return_tensors="pt")
    assert torch.allclose(white_output["pixel_values"][0, :, 5, 5], white, atol=1e-5)


def test_small_images_are_padded_to_one_crop_with_the_mean_colour(small_processor):
    output = small_processor(
        PIL.Image.new("RGB", (30, 20), (255, 255, 255)), size={"shortest_edge": 20}, return_tensors="pt"
    )
    assert output["image_sizes"].tolist() == [[20, 30]]
    assert output["pixel_values"].shape == (1, 3, 64, 64)
    assert (output["pixel_values"][0, :, 20:, :] == 0).all() and (output["pixel_values"][0, :, :, 30:] == 0).all()
    assert (output["pixel_values"][0, :, :20, :30] > 2).all()


def test_channel_layout_is_read_from_the_input_type(image_processor):
    # Tiny NumPy images are channels-last (as np.asarray(PIL) gives them), not read as channels-first.
    assert image_processor(np.zeros((1, 1, 3), np.uint8), do_sliding_window=False)["image_sizes"].tolist() == [
        [512, 512]
    ]
    assert image_processor(np.zeros((3, 5, 3), np.uint8), do_sliding_window=False)["image_sizes"].tolist() == [
        [512, 853]
    ]
    assert image_processor(np.zeros((3, 5, 4), np.uint8), do_sliding_window=False)["image_sizes"].tolist() == [
        [512, 853]
    ]
    # Told channels-first, the same array is a 5 x 3 image.
    told = image_processor(np.zeros((3, 5, 3), np.uint8), input_data_format="channels_first", do_sliding_window=False)
    assert told["image_sizes"].tolist() == [[853, 512]]
    with pytest.raises(ValueError, match=r"\(3, 8, 3\).*input_data_format"):
        image_processor(torch.zeros(3, 8, 3, dtype=torch.uint8))


def test_16_bit_images_are_scaled_not_clipped(image_processor):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    as_16_bit = image_processor(PIL.Image.fromarray(values), do_sliding_window=False, return_tensors="pt")
    as_8_bit = image_processor(
        PIL.Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8).repeat(3, axis=0)), do_sliding_window=False,
        return_tensors="pt",
    )  # fmt: skip
    assert torch.equal(as_16_bit["pixel_values"], as_8_bit["pixel_values"])
    with pytest.raises(ValueError, match="mode 'I'"):
        image_processor(PIL.Image.fromarray(np.zeros((4, 4), dtype=np.int32)))


def test_non_finite_pixels_are_refused(image_processor):
    image = np.zeros((8, 8, 3), np.float32)
    image[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        image_processor(image)


def test_post_process_reassembles_windows_and_calibrates(small_processor):
    # Two images: one window (64x64) and three (64x112 resized); logits favour class 1 on the first, 2 on the second.
    logits = torch.full((1 + 2, 3, 8, 8), -5.0)
    logits[0, 1] = 5.0
    logits[1:, 2] = 5.0
    outputs = SimpleNamespace(logits=logits, image_sizes=torch.tensor([[64, 64], [64, 112]]), score_offsets=None)
    maps = small_processor.post_process_semantic_segmentation(outputs, target_sizes=[(10, 12), (7, 5)])
    assert [tuple(segmentation.shape) for segmentation in maps] == [(10, 12), (7, 5)]
    assert all(segmentation.dtype == torch.int64 for segmentation in maps)
    assert (maps[0] == 1).all() and (maps[1] == 2).all()
    resized_sizes = small_processor.post_process_semantic_segmentation(outputs)
    assert [tuple(segmentation.shape) for segmentation in resized_sizes] == [(64, 64), (64, 112)]
    # Offsets are subtracted from the sigmoid scores: a large offset on class 1 hands image 0 to class 0.
    outputs.score_offsets = torch.tensor([0.0, 1.0, 0.0])
    assert (small_processor.post_process_semantic_segmentation(outputs)[0] == 0).all()
    scores = small_processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    assert scores[1].segmentation_scores.shape == (3, 64, 112)


def test_post_process_refuses_inconsistent_inputs(small_processor):
    outputs = SimpleNamespace(
        logits=torch.zeros(2, 3, 8, 8), image_sizes=torch.tensor([[64, 200]]), score_offsets=None
    )
    with pytest.raises(ValueError, match=r"2 crops.*4 sliding windows"):
        small_processor.post_process_semantic_segmentation(outputs)
    outputs = SimpleNamespace(logits=torch.zeros(1, 3, 8, 8), image_sizes=torch.tensor([[64, 64]]), score_offsets=None)
    with pytest.raises(ValueError, match="target sizes"):
        small_processor.post_process_semantic_segmentation(outputs, target_sizes=[(4, 4), (5, 5)])
    outputs.logits[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits"):
        small_processor.post_process_semantic_segmentation(outputs)


def test_image_processor_round_trip(tmp_path, small_processor):
    small_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_clip_rc.CLIPRCImageProcessor"
    assert config["sliding_window_stride"] == 48 and config["do_sliding_window"] is True
    assert (tmp_path / "image_processing_clip_rc.py").is_file()
    reloaded = CLIPRCImageProcessor.from_pretrained(tmp_path)
    assert dict(reloaded.size) == {"shortest_edge": 64} and reloaded.sliding_window_stride == 48
    auto = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "CLIPRCImageProcessor"
    image = PIL.Image.new("RGB", (90, 70), (10, 20, 30))
    expected = small_processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(auto(image, return_tensors="pt")["pixel_values"], expected)


def test_class_names_become_templated_prompts_with_the_eot_kept(processor):
    tokenizer = processor.tokenizer
    output = processor.tokenize_class_names(["cat", "pottedplant", "sky"], return_tensors="pt")
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
    assert np.array(processor.tokenize_class_names("dog")["input_ids"]).shape == (1, 2, 32)
    assert processor.tokenize_class_names(["cat"], templates=["{}"], return_tensors="pt")["input_ids"].shape == (
        1,
        1,
        32,
    )
    with pytest.raises(ValueError, match="template"):
        processor.tokenize_class_names(["cat"], templates=["no slot"])


@pytest.mark.parametrize(
    "class_names, message",
    [
        ([], "at least one class"),
        (["cat", "cat"], "repeat"),
        (["cat", " "], r"position\(s\) \[1\]"),
        (["word " * 40], "exceed"),
    ],
)
def test_bad_class_names_are_refused_with_the_name(processor, class_names, message):
    with pytest.raises(ValueError, match=message):
        processor.tokenize_class_names(class_names)


def test_default_templates(image_processor):
    processor = CLIPRCProcessor(image_processor, build_test_tokenizer())
    assert processor.templates == ["a photo of a {}"]
    assert processor.tokenize_class_names(["cat", "dog"], return_tensors="pt")["input_ids"].shape == (2, 1, 32)


def test_processor_call_follows_transformers_conventions(processor):
    images = [PIL.Image.new("RGB", (64, 32)), PIL.Image.new("RGB", (32, 64))]
    output = processor(images=images, text=["a cat", "a dog"], return_tensors="pt")
    assert output["pixel_values"].shape == (6, 3, 512, 512)
    assert output["image_sizes"].tolist() == [[512, 1024], [1024, 512]]
    # Text prompts go through the tokenizer as they are, padded to its length.
    assert torch.equal(
        output["input_ids"],
        processor.tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt")["input_ids"],
    )
    images_only = processor(images=images[0], return_tensors="pt", size={"shortest_edge": 64}, do_sliding_window=False)
    assert images_only["pixel_values"].shape == (1, 3, 64, 128) and "input_ids" not in images_only
    nested = processor(
        images=images[0],
        images_kwargs={"size": {"shortest_edge": 64}, "do_sliding_window": False},
        return_tensors="pt",
    )
    assert torch.equal(nested["pixel_values"], images_only["pixel_values"])
    with pytest.raises(ValueError, match="Pass images, text"):
        processor()


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
    expected = {
        **processor(images=image, return_tensors="pt"),
        **processor.tokenize_class_names(["cat", "sky"], return_tensors="pt"),
    }
    for loaded in (reloaded, auto):
        assert loaded.templates == processor.templates
        output = {
            **loaded(images=image, return_tensors="pt"),
            **loaded.tokenize_class_names(["cat", "sky"], return_tensors="pt"),
        }
        for key in ("pixel_values", "image_sizes", "input_ids", "attention_mask"):
            assert torch.equal(output[key], expected[key]), key
