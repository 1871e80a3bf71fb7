"""Every speed-up equals the straightforward computation it replaces: the fused mask losses and blocked attention
(values and gradients), the chunked decoder without autograd, the shared text half of the query projection,
the image tower's QuickGELU and additive region mask, and the label maps assembled class by class without a canvas
for one window."""

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import QuickGELUActivation

from clip_rc import fused_ops, modeling_clip_rc
from clip_rc.fused_ops import (
    _block_keep_mask,
    _BlockedAttention,
    _mix64,
    _query_blocks,
    _random_words,
    blocked_attention,
    upsampled_mask_losses,
)
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor

from .conftest import tiny_config, tiny_model, without_dropout


# ---- mask losses ----------------------------------------------------------------------------------------------


def one_hot_mask_losses(logits, targets, alpha, gamma):
    """The reference's criterion written out: upsampled logits, one-hot targets, sigmoid focal and dice losses."""
    num_classes = logits.shape[1]
    upsampled = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False).flatten(2)
    flat_targets = targets.flatten(1)
    one_hot = F.one_hot(flat_targets.masked_fill(flat_targets == 255, num_classes), num_classes + 1)
    one_hot = one_hot[..., :num_classes].permute(0, 2, 1).to(logits.dtype)
    probabilities = upsampled.sigmoid()
    p_t = probabilities * one_hot + (1 - probabilities) * (1 - one_hot)
    alpha_t = alpha * one_hot + (1 - alpha) * (1 - one_hot) if alpha >= 0 else 1.0
    bce = F.binary_cross_entropy_with_logits(upsampled, one_hot, reduction="none")
    focal = (alpha_t * (1 - p_t) ** gamma * bce).mean(-1)
    dice = 1 - (2 * (probabilities * one_hot).sum(-1) + 1) / (probabilities.sum(-1) + one_hot.sum(-1) + 1)
    return focal, dice, one_hot.sum(-1) > 0


@pytest.mark.parametrize("elements_per_chunk", [2**30, 2 * 48 * 40])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 1.5)])
def test_mask_losses_and_gradients_equal_the_one_hot_computation(monkeypatch, elements_per_chunk, alpha, gamma):
    monkeypatch.setattr(fused_ops, "MASK_LOSS_ELEMENTS_PER_CHUNK", elements_per_chunk)
    torch.manual_seed(0)
    # A 6 x 5 grid upsampled to 48 x 40 (a non-integer scale), ignored pixels, a class absent from one image.
    logits = (torch.randn(2, 7, 6, 5, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 7, (2, 48, 40))
    targets[:, :5] = 255
    targets[1][targets[1] == 3] = 4
    focal_weights, dice_weights = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)

    expected = one_hot_mask_losses(logits, targets, alpha, gamma)
    (expected_gradient,) = torch.autograd.grad(
        (expected[0] * focal_weights + expected[1] * dice_weights).sum(), logits
    )
    focal, dice, present = upsampled_mask_losses(logits, targets, 255, alpha, gamma)
    (gradient,) = torch.autograd.grad((focal * focal_weights + dice * dice_weights).sum(), logits)

    torch.testing.assert_close(focal, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dice, expected[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-14)
    assert present.tolist() == expected[2].tolist() and not present[1, 3]


def test_mask_losses_keep_no_full_resolution_tensor_for_the_backward_pass():
    logits = torch.randn(1, 6, 8, 8, requires_grad=True)
    targets = torch.randint(0, 6, (1, 64, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor
    ):
        upsampled_mask_losses(logits, targets, 255, 0.25, 2.0)
    # The labelled pixels (ids and classes) and per-class sums; never C x 64 x 64 floats.
    assert sum(t.numel() * t.element_size() for t in saved) < 2.5 * 64 * 64 * 8
    assert all(t.numel() < 6 * 64 * 64 for t in saved)


def test_mask_losses_compute_in_fp32_for_bf16_logits():
    logits = torch.randn(1, 3, 4, 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 3, (1, 32, 32))
    focal, dice, _ = upsampled_mask_losses(logits, targets, 255, 0.25, 2.0)
    expected = one_hot_mask_losses(logits.detach().float(), targets, 0.25, 2.0)
    assert focal.dtype == dice.dtype == torch.float32
    torch.testing.assert_close(focal, expected[0])
    (focal.sum() + dice.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16


# ---- attention ----------------------------------------------------------------------------------------------------


def replayed_keep_mask(query, num_keys, seed, dropout):
    """The keep masks of `_BlockedAttention`, (batch, heads, queries, keys): per head, then per block of queries."""
    blocks = _query_blocks(query.shape[2], num_keys)
    heads = [
        torch.cat([_block_keep_mask(seed, head * len(blocks) + index, (rows.stop - rows.start, num_keys), dropout)
                   for index, rows in enumerate(blocks)])
        for head in range(query.shape[0] * query.shape[1])
    ]  # fmt: skip
    return torch.stack(heads).view(*query.shape[:3], num_keys)


@pytest.mark.parametrize("scores_per_block", [2**30, 1])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_blocked_attention_equals_the_plain_attention_with_its_masks(
    monkeypatch, scores_per_block, dropout, with_mask
):
    """One block per head, or blocks of 16 queries (three and a partial one); the additive mask broadcasts over
    images and heads as the image tower's region mask does."""
    monkeypatch.setattr(fused_ops, "ATTENTION_SCORES_PER_BLOCK", scores_per_block)
    monkeypatch.setattr(fused_ops, "MIN_QUERIES_PER_BLOCK", 16)
    torch.manual_seed(0)
    # Transposed views, as the projections give them.
    query = torch.randn(2, 57, 4, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    key = torch.randn(2, 4, 13, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 4, 13, 8, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 4, 57, 8, dtype=torch.float64)
    mask = None
    if with_mask:
        allowed = torch.rand(57, 13) < 0.7
        allowed[:, 0] = True
        mask = torch.zeros(1, 1, 57, 13, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)

    output = _BlockedAttention.apply(query, key, value, mask, dropout, 0.35, 1234)
    gradients = torch.autograd.grad(output, (query, key, value), grad_output)
    keep = replayed_keep_mask(query, 13, 1234, dropout)
    scores = (query @ key.transpose(-1, -2)) * 0.35 + (0 if mask is None else mask)
    expected = (scores.softmax(dim=-1) * keep / (1 - dropout)) @ value
    expected_gradients = torch.autograd.grad(expected, (query, key, value), grad_output)

    assert output.shape == (2, 4, 57, 8) and output.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)
    if dropout == 0:
        sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.35)
        torch.testing.assert_close(output, sdpa)


def test_attention_dropout_drops_at_its_rate_and_replays_from_the_seed():
    keep = _block_keep_mask(7, 0, (8, 256, 512), 0.1)
    assert set(keep.unique().tolist()) == {0.0, 1.0} and abs(keep.mean().item() - 0.9) < 0.003
    assert torch.equal(keep, _block_keep_mask(7, 0, (8, 256, 512), 0.1))
    other_block, other_seed = _block_keep_mask(7, 1, (8, 256, 512), 0.1), _block_keep_mask(8, 0, (8, 256, 512), 0.1)
    for other in (other_block, other_seed):
        assert abs(torch.corrcoef(torch.stack([keep.flatten(), other.flatten()]))[0, 1]) < 0.01
    # The multithreaded generator is splitmix64: its words equal the reference's sequence.
    key = _mix64(123)
    expected = [_mix64((key + index * 0x9E3779B97F4A7C15) % 2**64) for index in range(5)]
    assert [word % 2**64 for word in _random_words(key, 5).tolist()] == expected
    # The seed comes from the default generator: the same seed state gives the same dropout.
    query, key = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 9, 4)
    torch.manual_seed(3)
    first = blocked_attention(query, key, key, 0.5, dropout=0.5)
    torch.manual_seed(3)
    assert torch.equal(first, blocked_attention(query, key, key, 0.5, dropout=0.5))
    with pytest.raises(ValueError, match="dropout"):
        blocked_attention(query, key, key, 0.5, dropout=1.0)


def test_training_step_on_cpu_keeps_no_attention_map(monkeypatch):
    """The decoder's attention with dropout goes through the block-wise function: the step keeps none of the
    (heads, queries, keys) probability maps, and still trains (finite, non-zero decoder gradients)."""
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 0)  # the tiny model's maps count
    config = tiny_config(
        decoder_attention_dropout=0.1, id2label={i: f"class {i}" for i in range(12)}, seen_class_ids=None
    )
    model = tiny_model(config).train()
    torch.manual_seed(0)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: sizes.append(tensor.shape) or tensor, lambda t: t):
        loss = model(torch.randn(1, 3, 64, 64), labels=torch.randint(0, 12, (1, 64, 64))).loss
    loss.backward()
    num_queries = config.num_region_tokens * 12
    attention_map = (1, config.decoder_num_attention_heads, num_queries, 64)
    assert attention_map not in sizes and attention_map[:2] + attention_map[:1:-1] not in sizes
    gradient = model.decode_head.decoder_q[0].multihead_attn.q.weight.grad
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


# ---- decode head ----------------------------------------------------------------------------------------------


def plain_decoder_layer(layer, queries, memory):
    attention = layer.multihead_attn

    def split_heads(states):
        return states.view(states.shape[0], -1, attention.num_heads, attention.head_dim).transpose(1, 2)

    query, key, value = (
        split_heads(attention.q(queries)),
        split_heads(attention.k(memory)),
        split_heads(attention.v(memory)),
    )
    attended = ((query @ key.transpose(-1, -2)) * attention.scale).softmax(dim=-1) @ value
    attended = attention.proj(attended.transpose(1, 2).reshape(queries.shape))
    hidden = layer.norm2(queries + attended)
    return layer.norm3(hidden + layer.linear2(F.relu(layer.linear1(hidden))))


def plain_head_logits(head, features, text_embeds):
    """The decode head written as the reference computes it: the concatenated queries through `q_proj`, every
    query through every layer at once."""
    batch_size, _, height, width = features.patch_embeds.shape
    regions = features.region_embeds.flatten(2).transpose(1, 2)
    region_text = (regions + features.image_embeds[:, None])[:, :, None] * text_embeds[None, None]
    queries = head.q_proj(torch.cat([region_text, text_embeds.expand_as(region_text)], dim=-1).flatten(1, 2))
    region_map = F.interpolate(features.region_embeds, size=(height, width), mode="bilinear", align_corners=False)
    pixel_inputs = [
        region_map.flatten(2).transpose(1, 2),
        features.image_embeds[:, None].expand(-1, height * width, -1),
        features.patch_embeds.flatten(2).transpose(1, 2),
    ]
    pixels = head.lateral_proj(torch.cat(pixel_inputs, dim=-1))
    for query_layer, pixel_layer in zip(head.decoder_q, head.decoder_v):
        queries, pixels = (
            plain_decoder_layer(query_layer, queries, pixels),
            plain_decoder_layer(pixel_layer, pixels, queries),
        )
    class_queries = queries.view(batch_size, regions.shape[1], text_embeds.shape[0], -1).mean(dim=1)
    return (class_queries @ pixels.transpose(1, 2)).view(batch_size, -1, height, width)


@pytest.mark.parametrize("queries_per_chunk", [7, 4096])
def test_decode_head_equals_the_plain_computation(monkeypatch, queries_per_chunk):
    """The shared text half of `q_proj` and, without autograd, queries in chunks sharing the memory's keys and values,
    give the logits of the plain computation."""
    monkeypatch.setattr(modeling_clip_rc, "DECODER_QUERIES_PER_CHUNK", queries_per_chunk)
    model = tiny_model(without_dropout()).eval()
    for layer in model.decode_head.decoder_v:  # zero-initialised: give the pixel stream's feed-forward some weight
        torch.nn.init.normal_(layer.linear2.weight, std=0.1)
    torch.manual_seed(0)
    text_embeds = F.normalize(torch.randn(40, 24), dim=-1)
    features = model.clip_rc(pixel_values=torch.randn(2, 3, 64, 64))
    expected = plain_head_logits(model.decode_head, features, text_embeds)
    with torch.no_grad():
        logits = model.decode_head(features, text_embeds).logits
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-5, atol=1e-5)
    # With autograd (training), the same logits through the unchunked layers.
    torch.testing.assert_close(model.decode_head(features, text_embeds).logits, expected, rtol=1e-5, atol=1e-5)


# ---- image tower ----------------------------------------------------------------------------------------------


def test_quick_gelu_equals_clips_activation_in_place_and_with_autograd():
    """silu(1.702 x) / 1.702 is CLIP's x * sigmoid(1.702 x): in place without autograd (the feed-forward's fresh
    activations), out of place with it, with the same gradient."""
    activation, clip_activation = modeling_clip_rc.CLIPRCQuickGELU(), QuickGELUActivation()
    torch.manual_seed(0)
    inputs, output_weights = torch.randn(64, 96) * 4, torch.randn(64, 96)
    expected = clip_activation(inputs)
    with torch.no_grad():
        activations = inputs.clone()
        result = activation(activations)
    assert result.data_ptr() == activations.data_ptr()
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)

    leaf, clip_leaf = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    values = activation(leaf)
    assert torch.equal(leaf.detach(), inputs)  # autograd needs the input: left alone
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)
    (gradient,) = torch.autograd.grad((values * output_weights).sum(), leaf)
    (expected_gradient,) = torch.autograd.grad((clip_activation(clip_leaf) * output_weights).sum(), clip_leaf)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_image_tower_equals_clips_layers_with_a_boolean_region_mask(attention):
    """The tower's fast QuickGELU and additive region mask give the features of transformers' CLIP activation and
    of SDPA with the boolean mask."""
    model = tiny_model(without_dropout(attn_implementation=attention)).eval()
    tower = model.clip_rc.vision_model
    assert all(isinstance(layer.mlp.activation_fn, modeling_clip_rc.CLIPRCQuickGELU) for layer in tower.encoder.layers)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = tower(pixel_values)
        mask = tower.attention_mask(8, 8, features)
        assert mask.dtype == torch.float32 and mask.shape == (1, 1) + features.shape[1:2] * 2
        allowed = modeling_clip_rc.build_region_attention_mask(model.config.num_prompt_tokens, 8, 8, 2)
        assert torch.equal(mask[0, 0] == 0, allowed)
        for layer in tower.encoder.layers:
            layer.mlp.activation_fn = QuickGELUActivation()
        if attention == "sdpa":
            tower.attention_mask = lambda *args: allowed[None, None]
        expected = tower(pixel_values)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


# ---- post-processing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes_per_chunk", [1, 3, 64])
def test_one_window_label_maps_equal_the_argmax_of_the_calibrated_scores(monkeypatch, classes_per_chunk):
    """One window needs no canvas and the classes fold into a running maximum: the label map is the arg-max of
    the reference's scores, including its ties (saturated sigmoids go to the lowest class)."""
    from clip_rc import image_processing_clip_rc

    monkeypatch.setattr(image_processing_clip_rc, "CLASSES_PER_CHUNK", classes_per_chunk)
    processor = CLIPRCImageProcessor.from_model_config(tiny_config())
    torch.manual_seed(0)
    offsets = torch.tensor([0.1] * 6 + [0.0] * 5)
    saturated = torch.randn(1, 11, 8, 8) * 30  # many tied scores
    moderate = torch.randn(1, 11, 8, 8)
    outputs = modeling_clip_rc.CLIPRCSemanticSegmenterOutput(
        logits=torch.cat([saturated, moderate]), score_offsets=offsets, image_sizes=torch.tensor([[64, 64], [40, 64]])
    )
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(64, 64), (30, 50)])

    def scores(logits):
        return (
            F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)[0].sigmoid()
            - offsets[:, None, None]
        )

    saturated_scores = scores(saturated)
    assert torch.equal(labels[0], saturated_scores.argmax(dim=0))
    assert (saturated_scores.max(dim=0).values == saturated_scores.topk(2, dim=0).values[1]).any()  # ties exercised
    # Resizing to a target size: bilinear resizing rounds by how many channels one call holds (PyTorch vectorises
    # across channels), so only untied scores are compared there.
    resized = F.interpolate(scores(moderate)[None, :, :40], size=(30, 50), mode="bilinear", align_corners=False)[0]
    assert torch.equal(labels[1], resized.argmax(dim=0))


def test_fast_dropout_drops_at_its_rate_and_its_gradient_uses_the_same_mask():
    inputs = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(0)
    outputs = fused_ops.fast_dropout(inputs, 0.25, training=True)
    kept = outputs != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(outputs[kept], inputs[kept] / 0.75)
    (gradient,) = torch.autograd.grad(outputs, inputs, torch.ones_like(outputs))
    torch.testing.assert_close(gradient, kept.float() / 0.75)
    assert torch.equal(fused_ops.fast_dropout(inputs, 0.25, training=False), inputs)
