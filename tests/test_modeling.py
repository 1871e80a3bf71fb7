"""Behaviour of CLIPRCForSemanticSegmentation on tiny configurations (SPEC §1-4)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation, CLIPConfig, CLIPModel

from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation, CLIPRCModel, CLIPRCProcessor
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor, sliding_windows
from clip_rc.modeling_clip_rc import build_region_attention_mask, resize_position_table

from .conftest import TINY_TEXT, TINY_VISION, tiny_config, tiny_model, without_dropout


def random_batch(batch_size=2, size=64, num_classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    labels[:, :5] = 255
    return pixel_values, labels


# ---- shapes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [3, 171])
def test_logit_shapes_follow_the_class_count(model, num_classes):
    model.eval()
    text_embeds = F.normalize(torch.randn(num_classes, 24), dim=-1)
    output = model(torch.randn(2, 3, 64, 64), text_embeds=text_embeds)
    assert output.logits.shape == (2, num_classes, 8, 8)
    assert output.loss is None and output.class_ids is None


def test_persisted_class_embeddings_are_used_without_text(model):
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    output = model(pixel_values)
    assert output.class_ids.tolist() == [0, 1, 2]
    explicit = model(pixel_values, text_embeds=model.class_embeddings)
    torch.testing.assert_close(output.logits, explicit.logits)


def test_missing_class_embeddings_raise():
    model = CLIPRCForSemanticSegmentation(tiny_config())
    with pytest.raises(ValueError, match="no class embeddings"):
        model(torch.randn(1, 3, 64, 64))


def test_tuple_output(model):
    model.eval()
    logits = model(torch.randn(1, 3, 64, 64), return_dict=False)[0]
    assert logits.shape == (1, 3, 8, 8)


# ---- the region attention mask ---------------------------------------------------------------------------------


def test_region_attention_mask_structure():
    num_prompts, grid, cells = 3, 8, 2
    allowed = build_region_attention_mask(num_prompts, grid, grid, cells)
    first_patch, first_region = 1 + num_prompts, 1 + num_prompts + grid * grid
    assert allowed.shape == (first_region + cells * cells,) * 2
    # Class, prompt and patch tokens see each other freely.
    assert allowed[:first_region, :first_region].all()
    # Class and prompt tokens see no region token.
    assert not allowed[:first_patch, first_region:].any()
    for row in range(grid):
        for col in range(grid):
            patch = first_patch + row * grid + col
            cell = (row // (grid // cells)) * cells + col // (grid // cells)
            visible_regions = allowed[patch, first_region:].nonzero().flatten().tolist()
            assert visible_regions == [cell]
    for cell in range(cells * cells):
        region = first_region + cell
        seen = set(allowed[region].nonzero().flatten().tolist())
        cell_row, cell_col = divmod(cell, cells)
        expected = {
            first_patch + row * grid + col
            for row in range(cell_row * 4, cell_row * 4 + 4)
            for col in range(cell_col * 4, cell_col * 4 + 4)
        } | {region}
        assert seen == expected


def test_attention_weights_respect_the_region_mask():
    config = tiny_config(attn_implementation="eager")
    model = tiny_model(config).eval()
    output = model(torch.randn(1, 3, 64, 64), output_attentions=True)
    assert len(output.attentions) == 2
    allowed = build_region_attention_mask(3, 8, 8, 2)
    for attention in output.attentions:
        assert attention.shape == (1, 4, *allowed.shape)
        assert torch.all(attention[..., ~allowed] == 0)
        assert torch.all(attention.sum(-1).sub(1).abs() < 1e-5)
        # Every allowed pair gets some weight (softmax of finite scores).
        assert torch.all(attention[0, :, allowed] > 0)


def test_output_attentions_under_sdpa_warns_and_returns_none(model, caplog):
    # transformers' behaviour: SDPA cannot return attention maps; it says so and computes the same outputs.
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    output = model(pixel_values, output_attentions=True)
    assert output.attentions == ()
    torch.testing.assert_close(output.logits, model(pixel_values).logits)


def test_hidden_states_follow_the_argument_and_the_config(model):
    model.eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    output = model(pixel_values, output_hidden_states=True)
    # The first layer's input and every layer's output: [class, 3 prompts, 64 patches, 4 regions], width 32.
    assert len(output.hidden_states) == 3
    assert all(state.shape == (2, 1 + 3 + 64 + 4, 32) for state in output.hidden_states)
    assert model(pixel_values).hidden_states is None
    model.config.output_hidden_states = True
    assert len(model(pixel_values).hidden_states) == 3


def test_unknown_keyword_arguments_raise(model):
    with pytest.raises(TypeError, match="output_hidden_state"):
        model(torch.randn(1, 3, 64, 64), output_hidden_state=True)


def test_one_layer_tower_keeps_region_tokens_local():
    vision = dict(TINY_VISION, num_hidden_layers=1)
    model = tiny_model(tiny_config(vision_config=vision)).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    changed = pixel_values.clone()
    changed[:, :, 32:, :32] += 3.0  # the bottom-left cell of the 2x2 grid (index 2)
    before = model.clip_rc(pixel_values).region_embeds.flatten(2)
    after = model.clip_rc(changed).region_embeds.flatten(2)
    difference = (before - after).abs().amax(dim=1)[0]
    assert difference[2] > 1e-3
    assert torch.all(difference[[0, 1, 3]] < 1e-6)


# ---- trainable parameters ---------------------------------------------------------------------------------------


def test_trainable_parameters_are_the_references(model):
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    vision_trainable = {name for name in trainable if name.startswith("clip_rc.vision_model.")}
    assert vision_trainable == {
        "clip_rc.vision_model.prompt_embeddings",
        "clip_rc.vision_model.deep_prompt_embeddings",
        "clip_rc.vision_model.prompt_proj.weight",
        "clip_rc.vision_model.prompt_proj.bias",
        "clip_rc.vision_model.prompt_norm.weight",
        "clip_rc.vision_model.prompt_norm.bias",
    }
    head = {name for name, _ in model.named_parameters() if name.startswith("decode_head.")}
    assert head and head <= trainable
    assert trainable == vision_trainable | head


def test_region_tokens_train_when_asked():
    model = tiny_model(tiny_config(train_region_tokens=True))
    assert model.clip_rc.vision_model.region_tokens.requires_grad


def test_frozen_parts_get_no_gradient(model):
    pixel_values, labels = random_batch()
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
    assert model.clip_rc.vision_model.prompt_embeddings.grad.abs().sum() > 0
    assert model.decode_head.q_proj.weight.grad.abs().sum() > 0


# ---- losses and settings ----------------------------------------------------------------------------------------


def test_loss_terms_are_weighted_and_finite():
    config = without_dropout()
    model = tiny_model(config)
    pixel_values, labels = random_batch()
    output = model(pixel_values, labels=labels)
    assert set(output.loss_dict) == {"loss_focal", "loss_dice", "loss_recovery_query", "loss_recovery_pixel"}
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, sum(output.loss_dict.values()))

    unweighted = tiny_model(without_dropout(mask_loss_weight=1.0, dice_loss_weight=1.0, recovery_loss_weight=1.0))
    plain = unweighted(pixel_values, labels=labels).loss_dict
    torch.testing.assert_close(output.loss_dict["loss_focal"], 100 * plain["loss_focal"])
    torch.testing.assert_close(output.loss_dict["loss_recovery_pixel"], 2 * plain["loss_recovery_pixel"])


def test_loss_falls_over_twenty_steps():
    torch.manual_seed(0)
    model = tiny_model(without_dropout(setting="fully"))
    pixel_values, labels = random_batch(batch_size=2)
    labels = torch.zeros_like(labels)
    labels[:, :, 32:] = 1
    labels[:, 32:, :] = 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_inductive_training_sees_seen_classes_only():
    model = tiny_model(without_dropout())
    pixel_values, labels = random_batch()
    output = model(pixel_values, labels=labels)
    assert output.logits.shape[1] == 2
    assert output.class_ids.tolist() == [0, 1]

    # Unseen pixels (class 2) never contribute: turning them into ignore pixels changes nothing.
    unseen_ignored = labels.masked_fill(labels == 2, 255)
    again = model(pixel_values, labels=unseen_ignored)
    for name, value in output.loss_dict.items():
        torch.testing.assert_close(value, again.loss_dict[name], msg=name)


def test_inductive_targets_reindex_seen_classes():
    model = tiny_model(without_dropout(id2label={i: str(i) for i in range(4)}, seen_class_ids=[1, 3]))
    lookup = model._id_lookup([1, 3], "cpu")
    labels = torch.tensor([[0, 1, 2, 3, 255]])
    assert lookup[labels].tolist() == [[255, 0, 255, 1, 255]]


def test_transductive_pseudo_labels_are_unseen_classes_only():
    config = without_dropout(id2label={i: str(i) for i in range(5)}, seen_class_ids=[0, 1], setting="transductive")
    model = tiny_model(config)
    labels = torch.tensor([[[0, 1, 2, 3, 4, 255]]])
    mask_logits = torch.randn(1, 5, 1, 6)
    mask_logits[:, :2] += 100  # seen classes score highest everywhere: pseudo labels must still be unseen
    targets = model._pseudo_label_unseen(mask_logits, labels, model._id_lookup(list(range(5)), "cpu")[labels])
    assert targets[0, 0, :2].tolist() == [0, 1]
    assert targets[0, 0, 5].item() == 255
    expected = (mask_logits[0, 2:, 0, 2:5].argmax(dim=0) + 2).tolist()
    assert targets[0, 0, 2:5].tolist() == expected
    assert set(targets[0, 0, 2:5].tolist()) <= {2, 3, 4}


def test_transductive_head_sees_every_class():
    config = without_dropout(setting="transductive")
    model = tiny_model(config)
    pixel_values, labels = random_batch()
    output = model(pixel_values, labels=labels)
    assert output.logits.shape[1] == 3 and torch.isfinite(output.loss)


def test_labels_outside_the_class_range_raise(model):
    pixel_values, labels = random_batch()
    labels[0, 10, 10] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        model(pixel_values, labels=labels)


def test_labels_need_the_configured_classes(model):
    pixel_values, labels = random_batch()
    with pytest.raises(ValueError, match="3 classes"):
        model(pixel_values, labels=labels, text_embeds=F.normalize(torch.randn(5, 24), dim=-1))


# ---- inference: model logits through the image processor's post-processing -------------------------------------

PROCESSOR = CLIPRCImageProcessor.from_model_config(tiny_config())  # 64-pixel windows every 48 pixels


def protocol_scores(model, image, text_embeds=None, target_size=None):
    """Calibrated scores `(C, H, W)` of one normalised `(3, H, W)` image through the one path: the processor's
    windows, the model's logits, the processor's post-processing."""
    windows = torch.from_numpy(
        PROCESSOR.cut_windows(image.numpy(), PROCESSOR.crop_size, PROCESSOR.sliding_window_stride)
    )
    outputs = model(pixel_values=windows, image_sizes=torch.tensor([image.shape[-2:]]), text_embeds=text_embeds)
    target_sizes = [target_size] if target_size is not None else None
    result = PROCESSOR.post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores=True)[0]
    assert torch.equal(result.segmentation, result.segmentation_scores.argmax(dim=0))
    return result.segmentation_scores


def test_calibrated_scores_lower_seen_classes(model):
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    logits = model(pixel_values).logits
    expected = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False).sigmoid()
    expected[:, :2] -= 0.1
    torch.testing.assert_close(protocol_scores(model, pixel_values[0]), expected[0])


def test_sliding_windows_cover_every_pixel_like_the_reference():
    for height, width in [(64, 64), (64, 130), (111, 77), (500, 513)]:
        counts = torch.zeros(height, width)
        windows = sliding_windows(height, width, 64, 48)
        for top, bottom, left, right in windows:
            assert bottom - top == 64 and right - left == 64
            counts[top:bottom, left:right] += 1
        assert counts.min() >= 1
        rows = max(height - 64 + 47, 0) // 48 + 1
        cols = max(width - 64 + 47, 0) // 48 + 1
        assert len(windows) == rows * cols


def test_one_crop_label_maps_are_the_argmax_of_one_forward(model):
    model.eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    outputs = model(pixel_values)
    labels = PROCESSOR.post_process_semantic_segmentation(outputs)
    scores = F.interpolate(outputs.logits, size=(64, 64), mode="bilinear", align_corners=False).sigmoid()
    scores[:, :2] -= 0.1
    assert torch.equal(torch.stack(labels), scores.argmax(dim=1))


def test_sliding_window_averages_overlapping_windows(model):
    model.eval()
    image = torch.randn(3, 64, 112)
    scores = protocol_scores(model, image)
    left = protocol_scores(model, image[..., :64])
    right = protocol_scores(model, image[..., 48:])
    torch.testing.assert_close(scores[..., :48], left[..., :48])
    torch.testing.assert_close(scores[..., 64:], right[..., 16:])
    torch.testing.assert_close(scores[..., 48:64], (left[..., 48:] + right[..., :16]) / 2)


def test_small_images_are_one_padded_crop_cut_back(model):
    model.eval()
    image = torch.randn(3, 40, 50)
    padded = F.pad(image, (0, 14, 0, 24))
    torch.testing.assert_close(protocol_scores(model, image), protocol_scores(model, padded)[..., :40, :50])
    resized = protocol_scores(model, image, target_size=(20, 25))
    assert resized.shape == (3, 20, 25)


def test_open_vocabulary_text_has_no_seen_offset(model):
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    text_embeds = F.normalize(torch.randn(4, 24), dim=-1)
    outputs = model(pixel_values, text_embeds=text_embeds)
    assert torch.equal(outputs.score_offsets, torch.zeros(4))
    expected = F.interpolate(outputs.logits, size=(64, 64), mode="bilinear", align_corners=False).sigmoid()
    torch.testing.assert_close(protocol_scores(model, pixel_values[0], text_embeds=text_embeds), expected[0])


def test_bf16_autocast_runs_close_to_fp32(model):
    model.eval()
    image = torch.randn(3, 64, 64)
    reference = protocol_scores(model, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = protocol_scores(model, image)
    assert (low_precision.float() - reference).abs().max() < 5e-2


@pytest.mark.slow
def test_compiled_inference_equals_eager(model):
    """`torch.compile` of the image tower and the head (in place, as `clip-rc-benchmark --compile` does) serves the
    sliding-window path with the eager scores."""
    model.eval()
    image = torch.randn(3, 64, 96)
    expected = protocol_scores(model, image)
    model.clip_rc.vision_model.compile()
    model.decode_head.compile()
    torch.testing.assert_close(protocol_scores(model, image), expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_training_step_runs_close_to_fp32():
    model = tiny_model(without_dropout())
    pixel_values, labels = random_batch()
    reference = model(pixel_values, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = model(pixel_values, labels=labels).loss
    assert low_precision.dtype == torch.float32  # the losses are computed in fp32 on upsampled fp32 logits
    low_precision.backward()
    assert model.clip_rc.vision_model.deep_prompt_embeddings.grad.isfinite().all()
    assert abs(low_precision.item() - reference.item()) < 2e-2 * reference.item()


def test_other_resolutions_interpolate_positions(model):
    model.eval()
    assert model(torch.randn(1, 3, 96, 128)).logits.shape == (1, 3, 12, 16)
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.randn(1, 3, 72, 64))


def test_torch_export_with_dynamic_image_size_equals_eager(model):
    from torch.export import Dim, export

    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    cells_high, cells_wide = Dim("cells_high", min=1, max=8), Dim("cells_wide", min=1, max=8)
    dynamic = {"pixel_values": {0: Dim("batch", min=1, max=8), 2: 32 * cells_high, 3: 32 * cells_wide}}
    exported = export(Logits(model), (torch.randn(2, 3, 64, 64),), dynamic_shapes=dynamic)
    for size in [(64, 64), (64, 128), (160, 96)]:
        pixel_values = torch.randn(3, 3, *size)
        torch.testing.assert_close(exported.module()(pixel_values), model(pixel_values).logits, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_attention_agree_and_eager_returns_attentions():
    sdpa = tiny_model(tiny_config()).eval()
    eager = tiny_model(tiny_config(attn_implementation="eager")).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    reference = sdpa(pixel_values, output_hidden_states=True)
    output = eager(pixel_values, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(output.logits, reference.logits, rtol=1e-4, atol=1e-4)
    for state, reference_state in zip(output.hidden_states, reference.hidden_states):
        torch.testing.assert_close(state, reference_state, rtol=1e-4, atol=1e-4)
    assert len(output.attentions) == 2
    eager.config.output_attentions = True
    assert len(eager(pixel_values).attentions) == 2


# ---- base model -------------------------------------------------------------------------------------------------


def test_base_model_features_follow_transformers_contracts(model):
    base = model.clip_rc.eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    features = base.get_image_features(pixel_values)
    assert features.last_hidden_state.shape == (2, 1 + 3 + 64 + 4, 32)
    torch.testing.assert_close(F.normalize(features.pooler_output, dim=-1), base(pixel_values).image_embeds)
    assert isinstance(base.get_image_features(pixel_values, return_dict=False), tuple)
    input_ids = torch.randint(0, 60, (3, 6))
    input_ids[:, -1] = 63
    text = base.get_text_features(input_ids)
    torch.testing.assert_close(F.normalize(text.pooler_output, dim=-1), base.encode_class_prompts(input_ids))
    assert base.get_input_embeddings() is base.text_model.embeddings.token_embedding
    assert base(pixel_values, input_ids=input_ids).text_embeds.shape == (3, 24)


def test_from_pretrained_with_loading_info_returns_the_frozen_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = CLIPRCForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not loaded.clip_rc.text_model.embeddings.token_embedding.weight.requires_grad
    assert loaded.clip_rc.vision_model.prompt_embeddings.requires_grad
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "CLIPRCModel"
    torch.testing.assert_close(base.vision_model.region_tokens, model.clip_rc.vision_model.region_tokens)


# ---- text side --------------------------------------------------------------------------------------------------


def test_encode_class_prompts_averages_templates(model):
    input_ids = torch.randint(0, 60, (3, 2, 6))
    input_ids[..., -1] = 63  # end-of-text token
    encode = model.clip_rc.encode_class_prompts
    per_template = torch.stack([encode(input_ids[:, index]) for index in range(2)], dim=1)
    expected = F.normalize(per_template.mean(dim=1), dim=-1)
    torch.testing.assert_close(encode(input_ids), expected)
    torch.testing.assert_close(encode(input_ids).norm(dim=-1), torch.ones(3))
    output = model.eval()(torch.randn(1, 3, 64, 64), input_ids=input_ids)
    assert output.logits.shape == (1, 3, 8, 8)


# ---- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"region_grid_size": 3}, "region_grid_size"),
        ({"seen_class_ids": [0, 5]}, "seen_class_ids"),
        ({"seen_class_ids": [0, 0]}, "seen_class_ids"),
        ({"setting": "semi"}, "setting"),
        ({"crop_size": 60}, "crop_size"),
        ({"prompt_templates": ["no slot"]}, "prompt_templates"),
        ({"setting": "transductive", "seen_class_ids": [0, 1, 2]}, "transductive"),
    ],
)
def test_bad_config_values_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_region_grid_error_names_allowed_values():
    with pytest.raises(ValueError, match=r"allowed values: \[1, 2, 4, 8\]"):
        tiny_config(region_grid_size=3)


def test_presets_follow_the_reference_recipes():
    voc = CLIPRCConfig.from_preset("voc-inductive")
    assert voc.num_labels == 20 and voc.unseen_class_ids == [15, 16, 17, 18, 19]
    assert voc.id2label[15] == "pottedplant" and voc.id2label[19] == "tvmonitor"
    assert (voc.mask_loss_weight, voc.dice_loss_weight, voc.recovery_loss_weight) == (100, 1, 2)
    assert voc.num_prompt_tokens == 10 and voc.prompt_templates == ["a photo of a {}"]
    assert voc.vision_config.patch_size == 16 and voc.vision_config.hidden_size == 768
    assert voc.seen_score_bias == 0.1 and voc.crop_size == 512 and voc.sliding_window_stride == 426

    assert CLIPRCConfig.from_preset("voc-fully").recovery_loss_weight == 0
    assert CLIPRCConfig.from_preset("voc-transductive").seen_score_bias == 0.0
    coco = CLIPRCConfig.from_preset("coco-stuff-inductive")
    assert coco.num_labels == 171 and coco.num_prompt_tokens == 100 and len(coco.prompt_templates) == 15
    assert coco.unseen_class_ids == [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert (coco.mask_loss_weight, coco.dice_loss_weight, coco.recovery_loss_weight) == (200, 3, 50)
    coco_fully = CLIPRCConfig.from_preset("coco-stuff-fully")
    assert (coco_fully.mask_loss_weight, coco_fully.dice_loss_weight, coco_fully.recovery_loss_weight) == (100, 1.5, 1)
    assert coco_fully.trained_class_ids == list(range(171))
    with pytest.raises(ValueError, match="voc-inductive"):
        CLIPRCConfig.from_preset("ade-inductive")


def test_full_size_preset_builds_the_reference_shapes():
    config = CLIPRCConfig.from_preset("voc-inductive")
    with torch.device("meta"):
        model = CLIPRCForSemanticSegmentation(config)
    assert model.clip_rc.vision_model.embeddings.position_embedding.weight.shape == (1025, 768)
    assert model.clip_rc.vision_model.region_tokens.shape == (16, 768)
    assert model.clip_rc.vision_model.deep_prompt_embeddings.shape == (11, 10, 768)
    assert model.decode_head.q_proj.weight.shape == (512, 1024)
    assert model.decode_head.lateral_proj.weight.shape == (512, 1536)
    assert model.decode_head.recovery.query_out.weight.shape == (1024, 512)


# ---- saving, loading, Auto classes ------------------------------------------------------------------------------


def test_save_and_load_give_identical_logits(model, tmp_path):
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    expected = model(pixel_values).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSemanticSegmentation"].endswith("CLIPRCForSemanticSegmentation")
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CLIPRCForSemanticSegmentation)
    assert torch.equal(loaded(pixel_values).logits, expected)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CLIPRCModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CLIPRCConfig)
    assert loaded.clip_rc.vision_model.prompt_embeddings.requires_grad
    assert not loaded.clip_rc.text_model.embeddings.token_embedding.weight.requires_grad


def test_trust_remote_code_load_in_a_fresh_process(model, tmp_path):
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    torch.save(model(pixel_values).logits, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForSemanticSegmentation
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as the parent process
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert "clip_rc" not in sys.modules, "the package itself was imported"
        logits = model(torch.load({str(tmp_path / "pixels.pt")!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r}))
        print(type(model).__module__)
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout


# ---- initialisation from CLIP -----------------------------------------------------------------------------------


def tiny_clip(seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), projection_dim=24)
    return CLIPModel(config).eval()


def test_from_clip_copies_towers_and_initialises_regions(tmp_path):
    clip = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    model = CLIPRCForSemanticSegmentation.from_clip(tmp_path / "clip", tiny_config())
    clip_state = clip.state_dict()
    model_state = model.state_dict()
    for name in [
        "vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "vision_model.post_layernorm.bias",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_projection.weight",
        "visual_projection.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
    ]:
        assert torch.equal(model_state["clip_rc." + name], clip_state[name]), name
    source = clip_state["vision_model.embeddings.position_embedding.weight"]  # 1 + 4x4 rows at 32 px
    positions = model_state["clip_rc.vision_model.embeddings.position_embedding.weight"]
    assert positions.shape == (65, 32)
    assert torch.equal(positions[0], source[0])
    grid = source[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(positions[1:], expected)
    regions = model.clip_rc.vision_model.region_tokens
    torch.testing.assert_close(
        regions, (source[0] + clip_state["vision_model.embeddings.class_embedding"]).expand(4, -1)
    )
    # The text tower encodes as CLIP does.
    input_ids = torch.randint(0, 60, (3, 6))
    input_ids[:, -1] = 63
    expected_text = F.normalize(clip.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
    torch.testing.assert_close(model.clip_rc.encode_class_prompts(input_ids), expected_text)


def test_resize_position_table_keeps_matching_tables():
    table = torch.randn(65, 8)
    assert resize_position_table(table, 8) is table
    assert resize_position_table(table, 4).shape == (17, 8)


def test_from_clip_with_a_processor_persists_class_embeddings(tmp_path):
    from transformers import AutoTokenizer

    from .random_clip import save_random_clip

    clip_dir = save_random_clip(tmp_path / "clip")
    config = tiny_config(prompt_templates=["a photo of a {}", "there is a {} in the scene"])
    processor = CLIPRCProcessor(
        CLIPRCImageProcessor.from_model_config(config), AutoTokenizer.from_pretrained(clip_dir)
    )
    model = CLIPRCForSemanticSegmentation.from_clip(clip_dir, config, processor=processor).eval()
    prompts = processor.tokenize_class_names(["cat", "dog", "grass"], config.prompt_templates, return_tensors="pt")
    assert prompts["input_ids"].shape[:2] == (3, 2)
    torch.testing.assert_close(model.class_embeddings, model.clip_rc.encode_class_prompts(**prompts))
    # The saved model segments without a tokenizer.
    model.save_pretrained(tmp_path / "clip_rc")
    loaded = CLIPRCForSemanticSegmentation.from_pretrained(tmp_path / "clip_rc").eval()
    torch.testing.assert_close(loaded.class_embeddings, model.class_embeddings)
    pixel_values = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize("classes_per_chunk", [1, 7, 64])
def test_chunked_labels_equal_the_argmax_of_the_scores(model, classes_per_chunk, monkeypatch):
    from clip_rc import image_processing_clip_rc

    monkeypatch.setattr(image_processing_clip_rc, "CLASSES_PER_CHUNK", classes_per_chunk)
    model.eval()
    torch.manual_seed(3)
    text_embeds = F.normalize(torch.randn(40, 24), dim=-1)
    images = [torch.randn(3, 64, 112), torch.randn(3, 64, 112)]
    sizes = [(50, 97), (64, 112)]
    windows = torch.cat(
        [torch.from_numpy(PROCESSOR.cut_windows(image.numpy(), PROCESSOR.crop_size, 48)) for image in images]
    )
    outputs = model(pixel_values=windows, image_sizes=torch.tensor([[64, 112], [64, 112]]), text_embeds=text_embeds)
    labels = PROCESSOR.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    for image, size, label_map in zip(images, sizes, labels):
        assert torch.equal(label_map, protocol_scores(model, image, text_embeds, size).argmax(dim=0))


def test_from_clip_takes_config_fields_checked_against_the_clip():
    fields = {"crop_size": 64, "sliding_window_stride": 48, "num_prompt_tokens": 2, "region_grid_size": 4,
              "decoder_hidden_size": 24, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 48,
              "id2label": {0: "cat", 1: "dog"}}  # fmt: skip
    # A 4x4 region grid fits the tiny CLIP's 8x8 patch grid at 64 px, not ViT-B/16's 4x4 grid.
    model = CLIPRCForSemanticSegmentation.from_clip(tiny_clip(), fields)
    assert model.config.vision_config.patch_size == 8 and model.config.num_region_tokens == 16
    with pytest.raises(ValueError, match="region_grid_size"):
        CLIPRCForSemanticSegmentation.from_clip(tiny_clip(), {**fields, "region_grid_size": 3})


def _loss_gradients_and_saved_bytes(model, pixel_values, labels):
    """Loss terms, parameter gradients and the bytes autograd keeps for the backward pass of one training step
    (dropout masks drawn from seed 0)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    saved_bytes = 0

    def pack(tensor):
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(pixel_values, labels=labels)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss_dict, gradients, saved_bytes


def _assert_same_step(losses, gradients, expected_losses, expected_gradients):
    for name in expected_losses:
        torch.testing.assert_close(losses[name], expected_losses[name], rtol=1e-5, atol=1e-6)
    assert gradients.keys() == expected_gradients.keys() and "decode_head.q_proj.weight" in gradients
    for name in expected_gradients:
        torch.testing.assert_close(gradients[name], expected_gradients[name], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_keeps_the_results_and_saves_memory():
    """Checkpointing the image tower's and the decoder's layers replays the same dropout masks: same losses and
    gradients, and only the layers' inputs are kept for the backward pass."""
    from clip_rc.modeling_clip_rc import CLIPRCDecoderLayer

    model = tiny_model(tiny_config())
    assert model.config.decoder_attention_dropout > 0 and model.config.prompt_dropout > 0
    torch.manual_seed(1)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    expected_losses, expected_gradients, kept_bytes = _loss_gradients_and_saved_bytes(model, pixel_values, labels)
    model.activation_checkpointing_enable()
    decoder_layers = [module for module in model.modules() if isinstance(module, CLIPRCDecoderLayer)]
    assert len(decoder_layers) == 2 * model.config.decoder_num_layers + 2  # decoder stacks and recovery pair
    assert all(layer.gradient_checkpointing for layer in [*model.clip_rc.vision_model.encoder.layers, *decoder_layers])
    losses, gradients, checkpointed_bytes = _loss_gradients_and_saved_bytes(model, pixel_values, labels)
    _assert_same_step(losses, gradients, expected_losses, expected_gradients)
    # Each decoder layer no longer keeps its (batch, heads, queries, pixels) attention map (a query per region and
    # head class), nor each image-tower layer its 4x-wide MLP activations.
    num_queries = model.config.num_region_tokens * len(model.config.resolved_seen_class_ids)
    attention_map_bytes = 2 * model.config.decoder_num_attention_heads * num_queries * 64 * 4
    tokens = 1 + model.config.num_prompt_tokens + 64 + model.config.num_region_tokens
    mlp_bytes = 2 * tokens * TINY_VISION["intermediate_size"] * 4
    assert kept_bytes - checkpointed_bytes > len(decoder_layers) * attention_map_bytes + 2 * mlp_bytes
    assert checkpointed_bytes < 0.5 * kept_bytes


@pytest.mark.parametrize("setting", ["inductive", "transductive"])
def test_class_chunked_loss_equals_the_loss_over_all_classes(monkeypatch, setting):
    """With one class per chunk the mask losses are computed (and recomputed in the backward pass) class by class;
    losses and gradients equal the one-chunk computation, and the same (small) tensors are kept for the backward."""
    from clip_rc import fused_ops

    config = without_dropout(
        id2label={i: f"class {i}" for i in range(7)}, seen_class_ids=[0, 1, 2, 3, 5], setting=setting
    )
    model = tiny_model(config)
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    labels[:, :5] = 255

    def run(elements_per_chunk):
        monkeypatch.setattr(fused_ops, "MASK_LOSS_ELEMENTS_PER_CHUNK", elements_per_chunk)
        return _loss_gradients_and_saved_bytes(model, pixel_values, labels)

    whole_losses, whole_gradients, whole_saved = run(2**30)
    chunked_losses, chunked_gradients, chunked_saved = run(2 * 64 * 64)
    _assert_same_step(chunked_losses, chunked_gradients, whole_losses, whole_gradients)
    # Chunking changes only the few bytes of the chunk boundaries kept for the backward pass.
    assert abs(chunked_saved - whole_saved) < 64 * 64
