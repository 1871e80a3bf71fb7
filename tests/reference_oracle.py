"""
A test oracle: CLIP-RC's forward pass and losses written straight from SPEC §1-4 and a reading of the reference code
(`uyzhang/CLIP-RC`), on a state dict in the REFERENCE layout (`backbone.*`, `text_encoder.*`, `decode_head.*`).

It is deliberately plain and independent of `clip_rc`: fused-q/k/v attention by explicit matmuls, the region mask
built cell by cell with Python loops, the R region copies of each class mask summed one block at a time, the losses
computed image by image over the present classes, as the reference's criterion does. No dropout (the oracle is the
model in training mode with dropout off, or in eval mode).
"""

import math

import torch
import torch.nn.functional as F


# ---- building blocks ---------------------------------------------------------------------------------------------


def _linear(x, sd, prefix):
    return x @ sd[prefix + "weight"].t() + sd[prefix + "bias"]


def _layer_norm(x, sd, prefix, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _count(sd, prefix):
    indices = set()
    for key in sd:
        if key.startswith(prefix):
            indices.add(int(key[len(prefix) :].split(".")[0]))
    return len(indices)


def _clip_residual_block(x, sd, prefix, num_heads, additive_mask):
    """One CLIP `ResidualAttentionBlock` on a sequence-first tensor (L, B, D): pre-LN attention, pre-LN QuickGELU MLP."""
    length, batch, width = x.shape
    head_dim = width // num_heads
    h = _layer_norm(x, sd, prefix + "ln_1.")
    qkv = h @ sd[prefix + "attn.in_proj_weight"].t() + sd[prefix + "attn.in_proj_bias"]
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]

    def heads(t):  # (L, B, D) -> (B, heads, L, head_dim)
        return t.reshape(length, batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q), heads(k), heads(v)
    scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    if additive_mask is not None:
        scores = scores + additive_mask
    attended = scores.softmax(dim=-1) @ v  # (B, heads, L, head_dim)
    attended = attended.permute(2, 0, 1, 3).reshape(length, batch, width)
    x = x + _linear(attended, sd, prefix + "attn.out_proj.")
    h = _layer_norm(x, sd, prefix + "ln_2.")
    h = _linear(h, sd, prefix + "mlp.c_fc.")
    h = h * torch.sigmoid(1.702 * h)
    return x + _linear(h, sd, prefix + "mlp.c_proj.")


def region_attention_mask(num_prompt_tokens, spatial_size, region_grid):
    """The reference's additive mask over [cls, prompts, patches, regions], built cell by cell (0 open, -inf shut)."""
    num_regions = region_grid * region_grid
    size = 1 + num_prompt_tokens + spatial_size * spatial_size + num_regions
    stride = spatial_size // region_grid
    mask = torch.zeros(size, size)
    mask[:, size - num_regions :] = float("-inf")
    mask[size - num_regions :, :] = float("-inf")
    for i in range(region_grid):
        for j in range(region_grid):
            region_row = size - num_regions + i * region_grid + j
            for row in range(i * stride, (i + 1) * stride):
                for col in range(j * stride, (j + 1) * stride):
                    patch_row = 1 + num_prompt_tokens + row * spatial_size + col
                    mask[region_row, patch_row] = 0.0
                    mask[patch_row, region_row] = 0.0
    for r in range(num_regions):
        mask[size - num_regions + r, size - num_regions + r] = 0.0
    return mask


# ---- image and text towers ---------------------------------------------------------------------------------------


def reference_image_features(sd, pixel_values, num_prompt_tokens, region_grid, num_heads, prefix="backbone."):
    """Normalised (global (B, E), patch map (B, E, H, W), region map (B, E, g, g)) of the prompted CLIP ViT with RLB."""
    P = num_prompt_tokens
    R = region_grid * region_grid
    assert sd[prefix + "prompt_embeddings"].shape[1] == P
    assert sd[prefix + "region_level_bridge"].shape[0] == R
    x = F.conv2d(pixel_values, sd[prefix + "conv1.weight"], stride=sd[prefix + "conv1.weight"].shape[-1])
    B, D, H, W = x.shape
    x = x.reshape(B, D, H * W).permute(0, 2, 1)
    class_embedding = sd[prefix + "class_embedding"]
    x = torch.cat([class_embedding + torch.zeros(B, 1, D), x], dim=1)
    pos = sd[prefix + "positional_embedding"]
    table_grid = int(round(math.sqrt(pos.shape[0] - 1)))
    cls_pos = pos[0] + class_embedding  # the ZegCLIP / DenseCLIP quirk: the class token gets class_embedding twice
    spatial = pos[1:].reshape(1, table_grid, table_grid, D).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(H, W), mode="bilinear", align_corners=False)
    spatial = spatial.reshape(1, D, H * W).permute(0, 2, 1)
    x = x + torch.cat([cls_pos.reshape(1, 1, D), spatial], dim=1)
    x = torch.cat([x, sd[prefix + "region_level_bridge"].expand(B, -1, -1)], dim=1)
    x = _layer_norm(x, sd, prefix + "ln_pre.")

    def project_prompt(p):
        return _linear(p, sd, prefix + "prompt_proj.")

    x = torch.cat([x[:, :1], project_prompt(sd[prefix + "prompt_embeddings"]).expand(B, -1, -1), x[:, 1:]], dim=1)
    x = x.permute(1, 0, 2)  # sequence first, as the reference
    mask = region_attention_mask(P, H, region_grid)
    num_layers = _count(sd, prefix + "transformer.resblocks.")
    deep = sd[prefix + "deep_prompt_embeddings"]
    for i in range(num_layers):
        if i > 0:
            layer_prompt = project_prompt(deep[i - 1]).expand(B, -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:1], layer_prompt, x[1 + P :]], dim=0)
        x = _clip_residual_block(x, sd, f"{prefix}transformer.resblocks.{i}.", num_heads, mask)
    x = torch.cat([_layer_norm(x[:-R], sd, prefix + "prompt_norm.", eps=1e-6), x[-R:]], dim=0)
    x = x.permute(1, 0, 2)
    x = _layer_norm(x, sd, prefix + "ln_post.")
    x = x @ sd[prefix + "proj"]
    global_embedding = x[:, 0]
    patch_map = x[:, 1 + P : -R].reshape(B, H, W, -1).permute(0, 3, 1, 2)
    region_map = x[:, -R:].reshape(B, region_grid, region_grid, -1).permute(0, 3, 1, 2)
    return (
        global_embedding / global_embedding.norm(dim=1, keepdim=True),
        patch_map / patch_map.norm(dim=1, keepdim=True),
        region_map / region_map.norm(dim=1, keepdim=True),
    )


def reference_text_embeddings(sd, token_ids, num_heads, prefix="text_encoder."):
    """Normalised CLIP text embeddings: projection of the token at `token_ids.argmax(-1)` (CLIP's EOT rule)."""
    context = sd[prefix + "positional_embedding"].shape[0]
    if token_ids.shape[1] < context:
        token_ids = F.pad(token_ids, (0, context - token_ids.shape[1]), value=0)
    x = sd[prefix + "token_embedding.weight"][token_ids] + sd[prefix + "positional_embedding"]
    x = x.permute(1, 0, 2)
    causal = torch.full((context, context), float("-inf")).triu(1)
    for i in range(_count(sd, prefix + "transformer.resblocks.")):
        x = _clip_residual_block(x, sd, f"{prefix}transformer.resblocks.{i}.", num_heads, causal)
    x = _layer_norm(x.permute(1, 0, 2), sd, prefix + "ln_final.")
    x = x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ sd[prefix + "text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


# ---- decode head -------------------------------------------------------------------------------------------------


def _cross_attention(sd, prefix, queries, memory, num_heads):
    B, Nq, C = queries.shape
    Nk = memory.shape[1]
    d = C // num_heads
    q = _linear(queries, sd, prefix + "q.").reshape(B, Nq, num_heads, d).permute(0, 2, 1, 3)
    k = _linear(memory, sd, prefix + "k.").reshape(B, Nk, num_heads, d).permute(0, 2, 1, 3)
    v = _linear(memory, sd, prefix + "v.").reshape(B, Nk, num_heads, d).permute(0, 2, 1, 3)
    attn = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
    return _linear((attn @ v).transpose(1, 2).reshape(B, Nq, C), sd, prefix + "proj.")


def _decoder_layer(sd, prefix, tgt, memory, num_heads):
    """TPN_DecoderLayer: cross-attention then ReLU FFN, post-norm (norm2, norm3); self_attn / norm1 unused."""
    tgt = _layer_norm(
        tgt + _cross_attention(sd, prefix + "multihead_attn.", tgt, memory, num_heads), sd, prefix + "norm2."
    )
    ffn = _linear(torch.relu(_linear(tgt, sd, prefix + "linear1.")), sd, prefix + "linear2.")
    return _layer_norm(tgt + ffn, sd, prefix + "norm3.")


def reference_decode_head(sd, global_embedding, patch_map, region_map, text_embeds, num_heads, image_size, training):
    prefix = "decode_head."
    B, E, H, W = patch_map.shape
    C = text_embeds.shape[0]
    g = region_map.shape[-1]
    R = g * g
    lateral = patch_map.flatten(2).transpose(1, 2)  # (B, N, E)
    ori_lateral = lateral.clone()

    # Region alignment queries, region-major: index r * C + c.
    regions = region_map.reshape(B, E, R).transpose(1, 2)
    rows = []
    for r in range(R):
        for c in range(C):
            aligned = (regions[:, r] + global_embedding) * text_embeds[c]
            rows.append(torch.cat([aligned, text_embeds[c].expand(B, -1)], dim=-1))
    q = torch.stack(rows, dim=1)  # (B, R*C, 2E)
    q_ori = q.clone()
    q = _linear(q, sd, prefix + "q_proj.")

    region_up = F.interpolate(region_map, size=(H, W), mode="bilinear", align_corners=False)
    region_up = region_up.reshape(B, E, H * W).transpose(1, 2)
    lateral = torch.cat([region_up, global_embedding[:, None].expand(B, H * W, E), lateral], dim=-1)
    lateral = _linear(lateral, sd, prefix + "lateral_proj.")

    for i in range(_count(sd, prefix + "decoder_q.layers.")):
        q, lateral = (
            _decoder_layer(sd, f"{prefix}decoder_q.layers.{i}.", q, lateral, num_heads),
            _decoder_layer(sd, f"{prefix}decoder_v.layers.{i}.", lateral, q, num_heads),
        )

    attn = q @ lateral.transpose(-2, -1)  # (B, R*C, N)
    attn = attn.reshape(B, R * C, H, W)
    fused = attn[:, :C].clone()
    for r in range(1, R):
        fused = fused + attn[:, r * C : (r + 1) * C]
    fused = fused / R
    out = {
        "mask_logits": fused,
        "pred_masks": F.interpolate(fused, size=(image_size, image_size), mode="bilinear", align_corners=False),
    }
    if training:
        rec = prefix + "recovery_decoder."
        q_rec = _linear(q, sd, rec + "linear_q_in.")
        lateral_rec = _linear(lateral, sd, rec + "linear_k_in.")
        for i in range(_count(sd, rec + "decouple_q.")):
            q_rec, lateral_rec = (
                _decoder_layer(sd, f"{rec}decouple_q.{i}.", q_rec, lateral_rec, num_heads),
                _decoder_layer(sd, f"{rec}decouple_v.{i}.", lateral_rec, q_rec, num_heads),
            )
        out.update(
            q=_linear(q_rec, sd, rec + "linear_q_out."),
            lateral=_linear(lateral_rec, sd, rec + "linear_k_out."),
            ori_q=q_ori,
            ori_lateral=ori_lateral,
        )
    return out


def reference_forward(
    state_dict,
    pixel_values,
    text_embeds,
    num_prompt_tokens,
    region_grid,
    vision_num_heads,
    decoder_num_heads=8,
    image_size=None,
    seen_idx=None,
    seen_weight=0.1,
    training=False,
):
    """
    The reference segmentor on one batch of crops.

    Args:
        text_embeds: (C, E) normalised class embeddings given to the head (the seen ones when training inductively).
        seen_idx: channels lowered by `seen_weight` in the inference scores (`semantic_inference`).
    Returns:
        dict with `pred_masks` (B, C, S, S) logits at `image_size`, `scores` (calibrated sigmoid), the image
        features, and in training the recovery tensors `q`, `lateral`, `ori_q`, `ori_lateral`.
    """
    image_size = image_size or pixel_values.shape[-1]
    global_embedding, patch_map, region_map = reference_image_features(
        state_dict, pixel_values, num_prompt_tokens, region_grid, vision_num_heads
    )
    out = reference_decode_head(
        state_dict, global_embedding, patch_map, region_map, text_embeds, decoder_num_heads, image_size, training
    )
    scores = out["pred_masks"].sigmoid()
    if seen_idx is not None:
        scores = scores.clone()
        scores[:, list(seen_idx)] = scores[:, list(seen_idx)] - seen_weight
    out.update(scores=scores, global_embedding=global_embedding, patch_map=patch_map, region_map=region_map)
    return out


# ---- losses ------------------------------------------------------------------------------------------------------


def reference_targets(labels, base_class, both_class, setting, pred_masks=None, ignore_index=255):
    """
    Labels as the reference's head sees them. Inductive: seen ids re-indexed 0..S-1, every other id -> ignore.
    Transductive: seen ids kept, unseen pixels -> arg-max unseen class of sigmoid(pred_masks). Fully: unchanged.
    """
    labels = labels.clone().long()
    if setting == "fully" or len(base_class) == len(both_class):
        return labels
    visible = torch.full((256,), -1, dtype=torch.long)
    visible[255] = 255
    for index, class_id in enumerate(base_class):
        visible[class_id] = index if setting == "inductive" else class_id
    mapped = visible[labels]
    if setting == "transductive":
        pseudo = pred_masks.detach().sigmoid().clone()
        pseudo[:, list(base_class)] = -1
        pseudo = pseudo.argmax(dim=1)
        mapped[mapped == -1] = pseudo[mapped == -1]
    mapped[mapped == -1] = ignore_index
    return mapped


def reference_losses(out, targets, mask_weight, dice_weight, recovery_weight, alpha=0.25, gamma=2.0, ignore_index=255):
    """
    SegLoss + SegPlusCriterion on head-channel targets (B, S, S): focal over every channel (ignored pixels are
    negatives), dice over the present classes, both divided by the number of (image, present class) pairs; L1 recovery.
    """
    pred = out["pred_masks"]
    B, C = pred.shape[:2]
    focal_total = pred.new_zeros(())
    dice_total = pred.new_zeros(())
    num_masks = 0
    for i in range(B):
        present = [int(c) for c in torch.unique(targets[i]) if int(c) != ignore_index]
        num_masks += len(present)
    num_masks = max(float(num_masks), 1.0)
    for i in range(B):
        target = torch.zeros(C, *targets.shape[1:])
        present = [int(c) for c in torch.unique(targets[i]) if int(c) != ignore_index]
        for c in present:
            target[c] = (targets[i] == c).float()
        for c in range(C):
            logits = pred[i, c].flatten()
            t = target[c].flatten()
            ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
            p = logits.sigmoid()
            p_t = p * t + (1 - p) * (1 - t)
            loss = ce * (1 - p_t) ** gamma
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
            focal_total = focal_total + loss.mean()
        for c in present:
            p = pred[i, c].sigmoid().flatten()
            t = target[c].flatten()
            dice_total = dice_total + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return {
        "loss_mask": mask_weight * focal_total / num_masks,
        "loss_dice": dice_weight * dice_total / num_masks,
        "recovery_loss_q": recovery_weight * (out["q"] - out["ori_q"].detach()).abs().mean(),
        "recovery_loss_k": recovery_weight * (out["lateral"] - out["ori_lateral"].detach()).abs().mean(),
    }
