"""The tiny CLIP of `clip_rc.toy.tiny_clip`: tokenizer, Hub-format folder, losses, and the chain into CLIP-RC."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPTokenizerFast

from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation, CLIPRCImageProcessor, CLIPRCProcessor
from clip_rc.toy.synthetic import SYNTHETIC_CLASSES, SyntheticWorld, synthetic_benchmark
from clip_rc.toy.tiny_clip import (
    TinyCLIPArguments,
    caption_corpus,
    image_to_pixel_values,
    patch_embeddings,
    patch_noun_loss,
    patch_probe,
    save_untrained_clip,
    text_embeddings,
    train_clip_tokenizer,
    train_tiny_clip,
)


NAMES = [c.name for c in SYNTHETIC_CLASSES]
# A recipe small enough for a unit test: 2-layer towers, a few steps.
TOY = {
    "vision_hidden_size": 32, "vision_layers": 2, "text_hidden_size": 32, "text_layers": 1, "projection_dim": 16, "steps": 3,
    "batch_size": 8, "log_every": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return train_clip_tokenizer(caption_corpus(num_captions=1500))


@pytest.fixture(scope="module")
def toy_clip_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-clip")
    train_tiny_clip(folder, TinyCLIPArguments(**TOY), tokenizer=tokenizer, show_progress=False)
    return folder


def test_tokenizer_round_trips_the_captions(tokenizer):
    world = SyntheticWorld()
    captions = [caption for _, _, caption, _ in world.generate(300, seed=99)] + caption_corpus(
        num_captions=300, seed=5
    )
    for caption in captions:
        ids = tokenizer(caption)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
        assert len(ids) <= tokenizer.model_max_length


def test_tokenizer_is_clip_shaped(tokenizer, tmp_path):
    assert isinstance(tokenizer, CLIPTokenizerFast)
    # every word of the captions, class names included, is a single token
    for name in NAMES + ["photo", "scene", "large", "tiny", "beside"]:
        assert tokenizer.tokenize(name) == [name + "</w>"]
    # start / end of text have the two highest ids, as in CLIP; padding is end of text
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    # any text encodes (byte fallback), lower-cased like CLIP's
    ids = tokenizer("A Photo of a ZEBRA!")["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a zebra !"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLIPTokenizerFast)
    prompts = [f"a photo of a {name}" for name in NAMES]
    assert reloaded(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]


def test_clip_folder_has_the_hub_layout(toy_clip_folder, tokenizer):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ):
        assert (toy_clip_folder / name).is_file(), name
    clip = CLIPModel.from_pretrained(toy_clip_folder)
    assert clip.config.vision_config.patch_size == 8 and clip.config.vision_config.image_size == 96
    assert clip.config.text_config.vocab_size == len(tokenizer)
    assert clip.config.text_config.eos_token_id == tokenizer.eos_token_id
    processor = CLIPImageProcessorPil.from_pretrained(toy_clip_folder)
    assert processor.crop_size["height"] == 96
    # the image processor normalises as the tiny CLIP was trained (ImageNet statistics on 0-255)
    image = SyntheticWorld().sample(np.random.default_rng(0))[0]
    from_processor = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_processor, image_to_pixel_values(image[None]), atol=2e-2, rtol=0)
    record = json.loads((toy_clip_folder / "tiny_clip_args.json").read_text())
    assert record["trained_on_captions"] is True


def test_clip_rc_starts_from_the_tiny_clip(toy_clip_folder):
    benchmark = synthetic_benchmark()
    clip = CLIPModel.from_pretrained(toy_clip_folder)
    config = CLIPRCConfig(
        vision_config=clip.config.vision_config.to_dict(), crop_size=96, sliding_window_stride=64, num_prompt_tokens=2,
        region_grid_size=4, decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
        id2label=benchmark.id2label,
        seen_class_ids=list(benchmark.seen_class_ids), prompt_templates=list(benchmark.templates),
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(toy_clip_folder)
    processor = CLIPRCProcessor(CLIPRCImageProcessor.from_model_config(config), tokenizer)
    model = CLIPRCForSemanticSegmentation.from_clip(str(toy_clip_folder), config, processor=processor)
    expected = text_embeddings(clip, tokenizer, benchmark.class_names, benchmark.templates)
    torch.testing.assert_close(model.class_embeddings, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = model.eval()(image_to_pixel_values(SyntheticWorld().sample(np.random.default_rng(1))[0][None])).logits
    assert logits.shape == (1, 12, 12, 12)


def test_untrained_control_shares_the_layout(tmp_path, tokenizer, toy_clip_folder):
    folder = save_untrained_clip(tmp_path / "control", TinyCLIPArguments(**TOY), tokenizer=tokenizer)
    trained, control = CLIPModel.from_pretrained(toy_clip_folder), CLIPModel.from_pretrained(folder)
    assert trained.config.to_dict()["vision_config"] == control.config.to_dict()["vision_config"]
    assert json.loads((folder / "tiny_clip_args.json").read_text())["trained_on_captions"] is False
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()


def test_patch_noun_loss_prefers_patches_showing_the_nouns():
    torch.manual_seed(0)
    nouns = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    background = torch.nn.functional.normalize(torch.randn(4, 4, 8), dim=-1)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]])

    def images(owners):  # image b: 4 background patches and 4 patches showing the nouns owners[b] names
        images = []
        for b, row in enumerate(owners):
            named = torch.nonzero(row)[:, 0]
            shown = torch.cat([nouns[k, None].expand(4 // len(named), 8) for k in named])
            images.append(torch.cat([background[b], shown]))
        return torch.stack(images)

    scale = torch.tensor(np.log(30.0))
    matched = patch_noun_loss(images(targets), nouns, targets, scale)
    mismatched = patch_noun_loss(images(targets[[1, 0, 3, 2]]), nouns, targets, scale)
    assert matched < mismatched
    patches = images(targets).clone().requires_grad_(True)
    patch_noun_loss(patches, nouns, targets, scale).backward()
    assert torch.isfinite(patches.grad).all() and patches.grad.abs().sum() > 0
    # a noun no image names (or an image naming nothing) is skipped, not a NaN
    assert torch.isfinite(
        patch_noun_loss(
            images(targets), nouns, torch.cat([targets[:, :2], torch.zeros(4, 1, dtype=torch.long)], 1), scale
        )
    )


def test_patch_embeddings_and_probe_shapes(toy_clip_folder):
    clip = CLIPModel.from_pretrained(toy_clip_folder)
    images = np.stack([SyntheticWorld().sample(np.random.default_rng(i))[0] for i in range(2)])
    patches = patch_embeddings(clip, image_to_pixel_values(images))
    assert patches.shape == (2, 144, 16)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, 144))
    result = patch_probe(str(toy_clip_folder), num_images=4)
    assert 0 <= result["unseen_pixel_accuracy"] <= 100 and result["num_pixels"] > 0
    assert set(result["per_class_IoU"]) == set(NAMES)
