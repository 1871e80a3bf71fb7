"""PyTorch CLIP-RC: CLIP with deep visual prompts, a Region-Level Bridge and a region-alignment decoder."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPTextModel
from transformers.utils import logging

from .configuration_clip_rc import CLIPRCConfig


logger = logging.get_logger(__name__)


@dataclass
class CLIPRCImageFeatures(ModelOutput):
    """
    L2-normalised image features of the prompted CLIP image tower, in the joint embedding space (width E).

    Args:
        global_embeds (`torch.FloatTensor` of shape `(batch_size, E)`): the class token.
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, E, height, width)`): one token per patch.
        region_embeds (`torch.FloatTensor` of shape `(batch_size, E, region_grid_size, region_grid_size)`):
            the region tokens of the Region-Level Bridge, one per grid cell, row-major.
        attentions (`tuple(torch.FloatTensor)`, *optional*): per layer, the attention probabilities of shape
            `(batch_size, num_heads, sequence_length, sequence_length)` over the sequence
            `[class, prompts, patches, regions]`; only with `output_attentions=True` and eager attention.
    """

    global_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CLIPRCSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`CLIPRCForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the weighted sum of `loss_dict`, when labels are given.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*): the weighted terms `loss_focal`, `loss_dice`,
            `loss_recovery_query` and `loss_recovery_pixel`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_classes, height / patch_size, width / patch_size)`):
            raw (pre-sigmoid) mask logits of the classes given to the head, at the patch-grid resolution. Bilinear
            upsampling (align_corners=False) to the input size gives the reference's `pred_masks`.
        class_ids (`torch.LongTensor` of shape `(num_classes,)`, *optional*): for each channel of `logits`, its id in
            the config's class list; set when the head saw the config's classes (with the persisted class
            embeddings, or with labels).
        attentions (`tuple(torch.FloatTensor)`, *optional*): the image tower's attention probabilities, see
            [`CLIPRCImageFeatures`].
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    class_ids: torch.LongTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def build_region_attention_mask(
    num_prompt_tokens: int, grid_height: int, grid_width: int, region_grid_size: int, device=None
) -> torch.BoolTensor:
    """
    The Region-Level Bridge's attention pattern over the sequence `[class, prompts, patches, regions]`.

    Class, prompt and patch tokens see each other freely and see no region token, except that each patch sees the
    region token of its own cell (the patch grid cut into `region_grid_size`² equal cells). A region token sees the
    patches of its cell and itself only.

    Returns:
        `torch.BoolTensor` of shape `(sequence_length, sequence_length)`, `True` where the query (row) may attend to
        the key (column).
    """
    num_patches = grid_height * grid_width
    num_regions = region_grid_size**2
    first_patch = 1 + num_prompt_tokens
    first_region = first_patch + num_patches
    sequence_length = first_region + num_regions

    rows = torch.arange(grid_height, device=device) // (grid_height // region_grid_size)
    cols = torch.arange(grid_width, device=device) // (grid_width // region_grid_size)
    patch_cell = (rows[:, None] * region_grid_size + cols[None, :]).flatten()
    patch_in_region = patch_cell[None, :] == torch.arange(num_regions, device=device)[:, None]

    allowed = torch.zeros(sequence_length, sequence_length, dtype=torch.bool, device=device)
    allowed[:first_region, :first_region] = True
    allowed[first_region:, first_patch:first_region] = patch_in_region
    allowed[first_patch:first_region, first_region:] = patch_in_region.T
    allowed[first_region:, first_region:] = torch.eye(num_regions, dtype=torch.bool, device=device)
    return allowed


class CLIPRCVisionEmbeddings(nn.Module):
    """CLIP's patch, class and position embeddings with the position table sized for the training crop."""

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        vision_config = config.vision_config
        self.embed_dim = vision_config.hidden_size
        self.patch_size = vision_config.patch_size
        self.grid_size = config.patch_grid_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            vision_config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(1 + self.grid_size**2, self.embed_dim)

    def forward(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
        Returns:
            `torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`: class token then patches.
        """
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype))
        batch_size, _, grid_height, grid_width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)

        positions = self.position_embedding.weight
        patch_positions = positions[1:]
        if (grid_height, grid_width) != (self.grid_size, self.grid_size):
            patch_positions = patch_positions.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
            patch_positions = F.interpolate(
                patch_positions, size=(grid_height, grid_width), mode="bilinear", align_corners=False
            )
            patch_positions = patch_positions.flatten(2).transpose(1, 2)[0]
        # The reference (after ZegCLIP/DenseCLIP) adds class_embedding to the class position row, so the class token
        # enters as 2 * class_embedding + position[0]; trained checkpoints depend on it.
        class_token = 2 * self.class_embedding + positions[0]
        class_token = class_token.expand(batch_size, 1, -1)
        return torch.cat([class_token, patch_embeds + patch_positions], dim=1)


class CLIPRCVisionTransformer(nn.Module):
    """
    CLIP's image transformer with deep visual prompts and the Region-Level Bridge. Module and weight names follow
    transformers' `CLIPVisionTransformer`, so CLIP weights in the Hub's format load by name.
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        embed_dim = vision_config.hidden_size
        num_layers = vision_config.num_hidden_layers
        self.num_prompt_tokens = config.num_prompt_tokens
        self.region_grid_size = config.region_grid_size
        self.num_region_tokens = config.num_region_tokens

        self.embeddings = CLIPRCVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(embed_dim, eps=vision_config.layer_norm_eps)
        self.encoder = CLIPEncoder(vision_config)
        self.post_layernorm = nn.LayerNorm(embed_dim, eps=vision_config.layer_norm_eps)

        self.region_tokens = nn.Parameter(torch.zeros(self.num_region_tokens, embed_dim))
        self.prompt_embeddings = nn.Parameter(torch.zeros(1, config.num_prompt_tokens, embed_dim))
        self.deep_prompt_embeddings = nn.Parameter(torch.zeros(num_layers - 1, config.num_prompt_tokens, embed_dim))
        self.prompt_proj = nn.Linear(embed_dim, embed_dim)
        self.prompt_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self._attention_masks: dict[tuple, torch.Tensor] = {}

    def attention_mask(self, grid_height: int, grid_width: int, device, dtype=None) -> torch.Tensor:
        """The region attention mask for a patch grid, built once per grid, device and dtype: boolean for SDPA,
        additive (0 / -inf) in `dtype` for eager attention."""
        key = (grid_height, grid_width, str(device), dtype)
        if key not in self._attention_masks:
            allowed = build_region_attention_mask(
                self.num_prompt_tokens, grid_height, grid_width, self.region_grid_size, device=device
            )
            if dtype is not None:
                additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
                allowed = additive.masked_fill(~allowed, torch.finfo(dtype).min)
            self._attention_masks[key] = allowed[None, None]
        return self._attention_masks[key]

    def forward(self, pixel_values: torch.FloatTensor, output_attentions: bool = False):
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): height and width multiples
                of `patch_size * region_grid_size`.
        Returns:
            `(hidden_states, attentions)`: `hidden_states` of shape `(batch_size, 1 + P + N + R, hidden_size)` after
            the prompt norm (all but the region tokens) and `post_layernorm`; `attentions` per layer or `None`.
        """
        patch_size = self.embeddings.patch_size
        height, width = pixel_values.shape[-2:]
        cell = patch_size * self.region_grid_size
        if height % cell or width % cell:
            raise ValueError(
                f"pixel_values of size {height}x{width}: height and width must be multiples of patch_size x "
                f"region_grid_size = {cell} so that every region cell holds whole patches."
            )
        grid_height, grid_width = height // patch_size, width // patch_size
        batch_size = pixel_values.shape[0]

        hidden_states = self.embeddings(pixel_values)
        region_tokens = self.region_tokens.to(hidden_states.dtype).expand(batch_size, -1, -1)
        hidden_states = self.pre_layrnorm(torch.cat([hidden_states, region_tokens], dim=1))

        # All prompt projections at once: row 0 feeds layer 0, row i replaces the prompt slots before layer i.
        prompts = torch.cat([self.prompt_embeddings, self.deep_prompt_embeddings], dim=0)
        prompts = self.prompt_dropout(self.prompt_proj(prompts))

        eager = self.config.vision_config._attn_implementation in (None, "eager")
        if output_attentions and not eager:
            raise ValueError("output_attentions=True needs eager attention: load with attn_implementation='eager'.")
        mask_dtype = hidden_states.dtype if eager else None
        if eager and torch.is_autocast_enabled(hidden_states.device.type):
            mask_dtype = torch.get_autocast_dtype(hidden_states.device.type)
        attention_mask = self.attention_mask(grid_height, grid_width, hidden_states.device, mask_dtype)

        attentions = [] if output_attentions else None
        hooks = []
        if output_attentions:
            for layer in self.encoder.layers:
                hooks.append(layer.self_attn.register_forward_hook(lambda _, __, out: attentions.append(out[1])))
        try:
            num_prompts = self.num_prompt_tokens
            for index, layer in enumerate(self.encoder.layers):
                layer_prompts = prompts[index].expand(batch_size, -1, -1).to(hidden_states.dtype)
                if index == 0:
                    hidden_states = torch.cat([hidden_states[:, :1], layer_prompts, hidden_states[:, 1:]], dim=1)
                else:
                    hidden_states = torch.cat(
                        [hidden_states[:, :1], layer_prompts, hidden_states[:, 1 + num_prompts :]], dim=1
                    )
                hidden_states = layer(hidden_states, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()

        region_start = hidden_states.shape[1] - self.num_region_tokens
        hidden_states = torch.cat(
            [self.prompt_norm(hidden_states[:, :region_start]), hidden_states[:, region_start:]], dim=1
        )
        hidden_states = self.post_layernorm(hidden_states)
        return hidden_states, tuple(attentions) if output_attentions else None


class CLIPRCCrossAttention(nn.Module):
    """Multi-head attention of queries over a separate memory, with separate q / k / v projections."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`queries` (batch, num_queries, hidden), `memory` (batch, num_keys, hidden) -> (batch, num_queries, hidden)."""
        batch_size, num_queries, hidden_size = queries.shape
        head_dim = hidden_size // self.num_heads
        query_states = self.q(queries).view(batch_size, num_queries, self.num_heads, head_dim).transpose(1, 2)
        key_states = self.k(memory).view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        value_states = self.v(memory).view(batch_size, -1, self.num_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            query_states, key_states, value_states, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(attended.transpose(1, 2).reshape(batch_size, num_queries, hidden_size))


class CLIPRCDecoderLayer(GradientCheckpointingLayer):
    """
    A post-norm transformer decoder layer without self-attention: cross-attention, then a ReLU feed-forward.

    With gradient checkpointing enabled it keeps only its inputs for the backward pass: in training, with attention
    dropout, CPU attention materialises the (heads, queries, keys) maps of 16 x C queries, the largest activations
    of the model (the recomputation replays the same dropout masks).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.multihead_attn = CLIPRCCrossAttention(hidden_size, num_heads, attention_dropout)
        self.linear1 = nn.Linear(hidden_size, intermediate_size)
        self.linear2 = nn.Linear(intermediate_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm3 = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm2(hidden_states + self.dropout(self.multihead_attn(hidden_states, memory)))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(hidden_states))))
        return self.norm3(hidden_states + self.dropout(feed_forward))


def _decoder_layer(config: CLIPRCConfig) -> CLIPRCDecoderLayer:
    return CLIPRCDecoderLayer(
        config.decoder_hidden_size,
        config.decoder_num_attention_heads,
        config.decoder_intermediate_size,
        config.decoder_dropout,
        config.decoder_attention_dropout,
    )


class CLIPRCRecoveryDecoder(nn.Module):
    """Maps the decoder's outputs back to its inputs (region-text queries and patch tokens) for the recovery loss."""

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        hidden_size, embed_dim = config.decoder_hidden_size, config.projection_dim
        self.query_in = nn.Linear(hidden_size, hidden_size)
        self.pixel_in = nn.Linear(hidden_size, hidden_size)
        self.query_layers = nn.ModuleList([_decoder_layer(config) for _ in range(config.recovery_num_layers)])
        self.pixel_layers = nn.ModuleList([_decoder_layer(config) for _ in range(config.recovery_num_layers)])
        self.query_out = nn.Linear(hidden_size, 2 * embed_dim)
        self.pixel_out = nn.Linear(hidden_size, embed_dim)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries` (B, R*C, hidden), `pixels` (B, N, hidden) -> (B, R*C, 2E) and (B, N, E)."""
        queries, pixels = self.query_in(queries), self.pixel_in(pixels)
        for query_layer, pixel_layer in zip(self.query_layers, self.pixel_layers):
            queries, pixels = query_layer(queries, pixels), pixel_layer(pixels, queries)
        return self.query_out(queries), self.pixel_out(pixels)


@dataclass
class CLIPRCDecoderOutput(ModelOutput):
    """
    Args:
        logits (`(B, C, h, w)`): mask logits averaged over the region copies of each class.
        region_text_queries (`(B, R*C, 2E)`): the decoder's input queries, region-major (index r*C + c).
        recovered_queries (`(B, R*C, 2E)`), recovered_pixels (`(B, h*w, E)`): recovery-branch outputs (training).
    """

    logits: torch.FloatTensor | None = None
    region_text_queries: torch.FloatTensor | None = None
    recovered_queries: torch.FloatTensor | None = None
    recovered_pixels: torch.FloatTensor | None = None


class CLIPRCDecodeHead(nn.Module):
    """
    Region-alignment decoder: one query per (region, class) pair, cross-attending with the pixel tokens; each
    class's mask is the average over its region copies of query-pixel dot products.
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        embed_dim, hidden_size = config.projection_dim, config.decoder_hidden_size
        self.q_proj = nn.Linear(2 * embed_dim, hidden_size)
        self.lateral_proj = nn.Linear(3 * embed_dim, hidden_size)
        self.decoder_q = nn.ModuleList([_decoder_layer(config) for _ in range(config.decoder_num_layers)])
        self.decoder_v = nn.ModuleList([_decoder_layer(config) for _ in range(config.decoder_num_layers)])
        self.recovery = CLIPRCRecoveryDecoder(config)

    def forward(
        self, image_features: CLIPRCImageFeatures, text_embeds: torch.Tensor, compute_recovery: bool = False
    ) -> CLIPRCDecoderOutput:
        """
        Args:
            image_features: normalised global (B, E), patch (B, E, h, w) and region (B, E, g, g) embeddings.
            text_embeds (`torch.FloatTensor` of shape `(C, E)`): normalised class embeddings.
            compute_recovery: also run the recovery branch (needed by the recovery loss).
        """
        global_embeds = image_features.global_embeds
        batch_size, embed_dim, grid_height, grid_width = image_features.patch_embeds.shape
        num_classes = text_embeds.shape[0]
        patch_tokens = image_features.patch_embeds.flatten(2).transpose(1, 2)
        region_tokens = image_features.region_embeds.flatten(2).transpose(1, 2)
        num_regions = region_tokens.shape[1]
        text_embeds = text_embeds.to(global_embeds.dtype)

        # Region alignment: query (r, c) = [(region_r + global) * text_c, text_c], flattened region-major.
        region_context = (region_tokens + global_embeds[:, None, :])[:, :, None, :]
        region_text = region_context * text_embeds[None, None]
        text_copies = text_embeds.expand(batch_size, num_regions, num_classes, embed_dim)
        region_text_queries = torch.cat([region_text, text_copies], dim=-1).reshape(batch_size, -1, 2 * embed_dim)

        region_map = F.interpolate(
            image_features.region_embeds, size=(grid_height, grid_width), mode="bilinear", align_corners=False
        )
        pixel_inputs = torch.cat(
            [
                region_map.flatten(2).transpose(1, 2),
                global_embeds[:, None, :].expand(-1, grid_height * grid_width, -1),
                patch_tokens,
            ],
            dim=-1,
        )

        queries = self.q_proj(region_text_queries)
        pixels = self.lateral_proj(pixel_inputs)
        for query_layer, pixel_layer in zip(self.decoder_q, self.decoder_v):
            queries, pixels = query_layer(queries, pixels), pixel_layer(pixels, queries)

        # Averaging the R region copies of a class's mask equals one product with the averaged query (linearity).
        class_queries = queries.view(batch_size, num_regions, num_classes, -1).mean(dim=1)
        logits = (class_queries @ pixels.transpose(1, 2)).view(batch_size, num_classes, grid_height, grid_width)

        recovered_queries = recovered_pixels = None
        if compute_recovery:
            recovered_queries, recovered_pixels = self.recovery(queries, pixels)
        return CLIPRCDecoderOutput(
            logits=logits,
            region_text_queries=region_text_queries,
            recovered_queries=recovered_queries,
            recovered_pixels=recovered_pixels,
        )


def mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, alpha: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Sigmoid focal and dice losses of every (image, class) mask against one-hot targets, without building the
    one-hot tensor: every pixel first counts as a negative of every class, then the true class's positive term
    replaces its negative one at labelled pixels. Ignored pixels stay negatives of every class, as in the reference.

    Args:
        logits (`(B, C, P)`): mask logits at the label resolution, flattened.
        targets (`(B, P)`): class ids in `[0, C)` or `ignore_index`.
    Returns:
        `(focal, dice, present)`, each `(B, C)`: the focal loss averaged over pixels, the dice loss
        `1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`, and whether the class has pixels in the image.
    """
    batch_size, num_classes, num_pixels = logits.shape
    valid = targets != ignore_index
    class_index = targets.masked_fill(~valid, 0)
    positive_weight, negative_weight = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)

    probabilities = logits.sigmoid()
    # BCE-with-logits against 0 is softplus(x), against 1 softplus(-x).
    negative_terms = negative_weight * probabilities.pow(gamma) * F.softplus(logits)
    true_logits = logits.gather(1, class_index[:, None]).squeeze(1)
    true_probabilities = true_logits.sigmoid()
    true_positive_terms = positive_weight * (1 - true_probabilities).pow(gamma) * F.softplus(-true_logits)
    true_negative_terms = negative_weight * true_probabilities.pow(gamma) * F.softplus(true_logits)

    def per_class_sum(values: torch.Tensor) -> torch.Tensor:
        totals = values.new_zeros(batch_size, num_classes)
        return totals.scatter_add(1, class_index, values * valid)

    focal = (negative_terms.sum(-1) + per_class_sum(true_positive_terms - true_negative_terms)) / num_pixels
    pixel_counts = per_class_sum(torch.ones_like(true_logits))
    intersection = per_class_sum(true_probabilities)
    dice = 1 - (2 * intersection + 1) / (probabilities.sum(-1) + pixel_counts + 1)
    return focal, dice, pixel_counts > 0


# Full-resolution logits per class chunk of the training loss (16 MB in fp32): with many classes, the upsampled
# logits and the loss's intermediates of one chunk at a time are alive, recomputed in the backward pass.
LOSS_ELEMENTS_PER_CHUNK = 2**22


def upsampled_mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, first_class: int, ignore_index: int, alpha: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    [`mask_losses`] of the head channels `first_class ... first_class + c - 1` on their logits upsampled
    (bilinear) to the label size. Pixels of the other channels are negatives of these, as they are in the loss over
    all channels, so the losses of consecutive channel ranges concatenate to those of every channel at once.

    Args:
        logits (`(B, c, h, w)`): mask logits of the channel range at the patch-grid resolution.
        targets (`(B, H, W)`): head channel ids of every channel, or `ignore_index`.
    """
    num_classes = logits.shape[1]
    mask_logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    in_range = (targets != ignore_index) & (targets >= first_class) & (targets < first_class + num_classes)
    range_targets = torch.where(in_range, targets - first_class, ignore_index)
    return mask_losses(mask_logits.flatten(2), range_targets.flatten(1), ignore_index, alpha, gamma)


def _global_mean_count(count: torch.Tensor) -> float:
    """The number of target masks averaged over processes (at least 1), as the reference normalises its losses."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return max(count.item(), 1.0)


class CLIPRCPreTrainedModel(PreTrainedModel):
    config: CLIPRCConfig
    config_class = CLIPRCConfig
    base_model_prefix = "clip_rc"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPRCDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CLIPRCVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.normal_(module.patch_embedding.weight, std=std)
            init.normal_(module.position_embedding.weight, std=std)
        elif isinstance(module, CLIPRCVisionTransformer):
            embed_dim = module.prompt_proj.in_features
            patch_size = module.embeddings.patch_size
            # Xavier-uniform bound over a 3-channel patch, as visual prompt tuning initialises its prompts.
            bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + embed_dim))
            init.uniform_(module.prompt_embeddings, -bound, bound)
            init.uniform_(module.deep_prompt_embeddings, -bound, bound)
            init.kaiming_normal_(module.prompt_proj.weight, a=0, mode="fan_out")
            bias_bound = 1 / math.sqrt(embed_dim)
            init.uniform_(module.prompt_proj.bias, -bias_bound, bias_bound)
            init.normal_(module.region_tokens, std=embed_dim**-0.5)
        elif isinstance(module, CLIPRCDecodeHead):
            # The pixel stream starts as the identity of its input: no feed-forward contribution.
            for layer in module.decoder_v:
                init.zeros_(layer.linear2.weight)
        elif isinstance(module, CLIPRCForSemanticSegmentation):
            init.zeros_(module.class_embeddings)


class CLIPRCForSemanticSegmentation(CLIPRCPreTrainedModel):
    """
    CLIP-RC for zero-shot semantic segmentation. A frozen CLIP ViT encodes the image with deep visual prompts and
    region tokens; a frozen CLIP text tower encodes the class names; a region-alignment decoder turns both into one
    mask per class.
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__(config)
        # The image tower's layers read their attention kernel (SDPA by default) from the vision sub-config.
        if config.vision_config._attn_implementation is None:
            config.vision_config._attn_implementation_internal = config._attn_implementation
        text_config = config.text_config
        self.vision_model = CLIPRCVisionTransformer(config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_model = CLIPTextModel._from_config(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        self.decode_head = CLIPRCDecodeHead(config)
        # Normalised text embeddings of the config's classes, so that a saved model segments without a tokenizer.
        self.register_buffer("class_embeddings", torch.zeros(config.num_labels, config.projection_dim))
        self.post_init()
        self.freeze_clip()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading materialises fresh parameters (all trainable): apply the reference's frozen set again.
        model = super().from_pretrained(*args, **kwargs)
        model.freeze_clip()
        return model

    def freeze_clip(self):
        """Freeze what the reference freezes: both CLIP towers and projections; the region tokens unless
        `config.train_region_tokens`. Prompts, prompt projection, prompt norm and the decode head stay trainable."""
        for name, parameter in self.named_parameters():
            if name.startswith(("text_model.", "text_projection.", "visual_projection.")):
                parameter.requires_grad_(False)
            elif name.startswith("vision_model."):
                local_name = name[len("vision_model.") :]
                trainable = "prompt" in local_name or (
                    local_name == "region_tokens" and self.config.train_region_tokens
                )
                parameter.requires_grad_(trainable)

    # ---- text side -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Class embeddings from tokenized prompts.

        Args:
            input_ids (`torch.LongTensor` of shape `(C, L)` or `(C, T, L)`): one prompt per class, or T templated
                prompts per class.
            attention_mask (same shape, *optional*).
        Returns:
            `torch.FloatTensor` of shape `(C, E)`: L2-normalised embeddings; with templates, the mean of the
            normalised per-template embeddings, normalised again.
        """
        if input_ids.dim() not in (2, 3):
            raise ValueError(f"input_ids must have shape (C, L) or (C, T, L), got {tuple(input_ids.shape)}.")
        num_classes = input_ids.shape[0]
        flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
        flat_mask = attention_mask.reshape(flat_ids.shape) if attention_mask is not None else None
        pooled = self.text_model(input_ids=flat_ids, attention_mask=flat_mask).pooler_output
        text_embeds = F.normalize(self.text_projection(pooled), dim=-1)
        if input_ids.dim() == 3:
            text_embeds = F.normalize(text_embeds.view(num_classes, input_ids.shape[1], -1).mean(dim=1), dim=-1)
        return text_embeds

    @torch.no_grad()
    def set_class_embeddings(self, text_embeds: torch.Tensor, class_names: list[str] | None = None):
        """
        Persist class embeddings (C, E) as the model's default classes; with `class_names`, `config.id2label` is
        replaced too (the zero-shot split is then cleared unless it still fits).
        """
        if text_embeds.dim() != 2 or text_embeds.shape[1] != self.config.projection_dim:
            raise ValueError(
                f"text_embeds must have shape (C, {self.config.projection_dim}), got {tuple(text_embeds.shape)}."
            )
        if class_names is not None:
            if len(class_names) != text_embeds.shape[0]:
                raise ValueError(f"{len(class_names)} class names for {text_embeds.shape[0]} embeddings.")
            if list(class_names) != self.config.class_names:
                self.config.id2label = dict(enumerate(class_names))
                self.config.label2id = {name: index for index, name in enumerate(class_names)}
                self.config.seen_class_ids = None
        elif text_embeds.shape[0] != self.config.num_labels:
            raise ValueError(
                f"{text_embeds.shape[0]} embeddings for {self.config.num_labels} configured classes; pass class_names."
            )
        self.class_embeddings = F.normalize(text_embeds.detach().float(), dim=-1).to(self.class_embeddings.device)

    def _class_embeddings(self, text_embeds, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (C, E) class embeddings to use and, when they are the config's classes (the persisted embeddings),
        their ids; `None` for classes given at run time."""
        if text_embeds is not None:
            if text_embeds.dim() != 2 or text_embeds.shape[1] != self.config.projection_dim:
                raise ValueError(
                    f"text_embeds must have shape (C, {self.config.projection_dim}), got {tuple(text_embeds.shape)}."
                )
            return text_embeds, None
        if input_ids is not None:
            return self.encode_text(input_ids, attention_mask), None
        # A host sync, skipped under torch.compile to keep the graph whole.
        if not torch.compiler.is_compiling() and not bool(self.class_embeddings.abs().sum() > 0):
            raise ValueError(
                "The model has no class embeddings: pass text_embeds or input_ids, or call set_class_embeddings()."
            )
        class_ids = torch.arange(self.class_embeddings.shape[0], device=self.class_embeddings.device)
        return self.class_embeddings, class_ids

    # ---- image side ------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.FloatTensor, output_attentions: bool = False) -> CLIPRCImageFeatures:
        """Normalised global, patch and region embeddings of a batch of crops (see [`CLIPRCImageFeatures`])."""
        hidden_states, attentions = self.vision_model(pixel_values, output_attentions=output_attentions)
        embeds = F.normalize(self.visual_projection(hidden_states), dim=-1)
        batch_size = pixel_values.shape[0]
        patch_size = self.config.vision_config.patch_size
        grid_height, grid_width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
        num_prompts, num_regions, grid = self.config.num_prompt_tokens, self.config.num_region_tokens, self.config.region_grid_size
        first_patch = 1 + num_prompts
        patch_embeds = embeds[:, first_patch : first_patch + grid_height * grid_width]
        region_embeds = embeds[:, -num_regions:]
        return CLIPRCImageFeatures(
            global_embeds=embeds[:, 0],
            patch_embeds=patch_embeds.transpose(1, 2).reshape(batch_size, -1, grid_height, grid_width),
            region_embeds=region_embeds.transpose(1, 2).reshape(batch_size, -1, grid, grid),
            attentions=attentions,
        )

    # ---- training targets and loss ---------------------------------------------------------------------------

    def _validate_labels(self, labels: torch.Tensor):
        ignore_index = self.config.ignore_index
        invalid = (labels != ignore_index) & ((labels < 0) | (labels >= self.config.num_labels))
        if bool(invalid.any()):
            bad_values = torch.unique(labels[invalid])[:10].tolist()
            raise ValueError(
                f"labels hold ids {bad_values} outside [0, {self.config.num_labels - 1}] that are not the ignore "
                f"index {ignore_index}."
            )

    def _id_lookup(self, class_ids: list[int], device) -> torch.Tensor:
        """A table mapping dataset class ids (and the ignore index) to head channels; other ids map to ignore."""
        ignore_index = self.config.ignore_index
        size = max(self.config.num_labels, ignore_index) + 1
        lookup = torch.full((size,), ignore_index, dtype=torch.long, device=device)
        lookup[torch.tensor(class_ids, dtype=torch.long, device=device)] = torch.arange(len(class_ids), device=device)
        return lookup

    def compute_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, decoder_output: CLIPRCDecoderOutput,
        image_features: CLIPRCImageFeatures,
    ) -> dict[str, torch.Tensor]:
        """
        Weighted focal, dice and recovery losses (SPEC §4).

        Args:
            logits (`(B, C, h, w)`): mask logits at the patch-grid resolution; the losses see them upsampled
                (bilinear) to the label size, a chunk of classes at a time (see `LOSS_ELEMENTS_PER_CHUNK`).
            targets (`(B, H, W)`): head channel ids, `ignore_index` for pixels that supervise nothing (they count
                as negatives of every class in the focal loss).
        """
        config = self.config
        batch_size, num_classes = logits.shape[:2]
        classes_per_chunk = max(1, LOSS_ELEMENTS_PER_CHUNK // (batch_size * targets[0].numel()))
        # Recomputing a chunk in the backward pass only pays when there are several chunks to keep apart.
        recompute = num_classes > classes_per_chunk and torch.is_grad_enabled() and logits.requires_grad
        chunk_losses = []
        for first in range(0, num_classes, classes_per_chunk):
            chunk_logits = logits[:, first : first + classes_per_chunk]
            arguments = (chunk_logits, targets, first, config.ignore_index, config.focal_alpha, config.focal_gamma)
            if recompute:
                chunk_losses.append(checkpoint(upsampled_mask_losses, *arguments, use_reentrant=False))
            else:
                chunk_losses.append(upsampled_mask_losses(*arguments))
        focal, dice, present = (torch.cat(parts, dim=1) for parts in zip(*chunk_losses))
        num_masks = _global_mean_count(present.sum().to(focal.dtype))
        focal = focal.sum() / num_masks
        dice = (dice * present).sum() / num_masks
        patch_tokens = image_features.patch_embeds.flatten(2).transpose(1, 2)
        recovery_query = F.l1_loss(decoder_output.recovered_queries, decoder_output.region_text_queries.detach())
        recovery_pixel = F.l1_loss(decoder_output.recovered_pixels, patch_tokens.detach())
        return {
            "loss_focal": config.mask_loss_weight * focal,
            "loss_dice": config.dice_loss_weight * dice,
            "loss_recovery_query": config.recovery_loss_weight * recovery_query,
            "loss_recovery_pixel": config.recovery_loss_weight * recovery_pixel,
        }

    # ---- forward ---------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        labels: torch.LongTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPRCSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised crops (see `CLIPRCImageProcessor`); height and width multiples of
                `patch_size * region_grid_size` (the training crop size in the reference).
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class ids of the config's class list, `ignore_index` (255) for unlabelled pixels. The model applies
                its `setting`: inductive training ignores unseen pixels and gives the head the seen classes only;
                transductive training gives the head every class and pseudo-labels unseen pixels with the arg-max
                unseen class of its own (detached) scores; fully supervised training uses every label.
            text_embeds (`torch.FloatTensor` of shape `(C, E)`, *optional*):
                Normalised class embeddings. With labels, they must be the config's `num_labels` classes.
            input_ids (`torch.LongTensor` of shape `(C, L)` or `(C, T, L)`, *optional*):
                Tokenized class prompts, encoded with [`~CLIPRCForSemanticSegmentation.encode_text`].
            attention_mask (*optional*): the attention mask of `input_ids`.
            Without `text_embeds` and `input_ids`, the persisted embeddings of the config's classes are used.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        class_embeds, class_ids = self._class_embeddings(text_embeds, input_ids, attention_mask)
        num_labels = self.config.num_labels

        if labels is not None:
            if class_embeds.shape[0] != num_labels:
                raise ValueError(
                    f"Training with labels needs the embeddings of the config's {num_labels} classes, got "
                    f"{class_embeds.shape[0]}."
                )
            self._validate_labels(labels)
            head_class_ids = (
                self.config.resolved_seen_class_ids if self.config.setting == "inductive" else list(range(num_labels))
            )
            class_ids = torch.tensor(head_class_ids, device=class_embeds.device)
            class_embeds = class_embeds[class_ids]

        image_features = self.get_image_features(pixel_values, output_attentions=bool(output_attentions))
        decoder_output = self.decode_head(image_features, class_embeds, compute_recovery=labels is not None)
        logits = decoder_output.logits

        loss = loss_dict = None
        if labels is not None:
            targets = self._id_lookup(class_ids.tolist(), labels.device)[labels.long()]
            if self.config.setting == "transductive":
                targets = self._pseudo_label_unseen(logits, labels, targets)
            loss_dict = self.compute_loss(logits, targets, decoder_output, image_features)
            loss = sum(loss_dict.values())

        output = CLIPRCSemanticSegmenterOutput(
            loss=loss, loss_dict=loss_dict, logits=logits, class_ids=class_ids, attentions=image_features.attentions
        )
        return output if return_dict else output.to_tuple()

    def _pseudo_label_unseen(self, logits, labels, targets) -> torch.Tensor:
        """Replace the targets of unseen-class pixels by the arg-max unseen class of the detached scores (the
        unseen channels of `logits` (B, C, h, w) upsampled to the label size)."""
        unseen = torch.tensor(self.config.unseen_class_ids, device=labels.device)
        with torch.no_grad():
            unseen_logits = F.interpolate(
                logits.detach()[:, unseen].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            # Ties where sigmoid saturates, as in the reference.
            pseudo_labels = unseen[unseen_logits.sigmoid().argmax(dim=1)]
        unseen_pixels = torch.isin(labels, unseen)
        return torch.where(unseen_pixels, pseudo_labels, targets)

    # ---- inference -------------------------------------------------------------------------------------------

    def score_offsets(self, class_ids: torch.Tensor | None, num_classes: int, device) -> torch.Tensor:
        """(C,) values subtracted from the sigmoid scores: `seen_score_bias` on the classes the head was trained on,
        when the channels are the config's classes; zeros for classes given at run time."""
        offsets = torch.zeros(num_classes, device=device)
        if class_ids is not None:
            trained = torch.tensor(self.config.trained_class_ids, device=device)
            offsets[torch.isin(class_ids, trained)] = self.config.seen_score_bias
        return offsets

    def _window_logits(self, padded: torch.Tensor, windows, class_embeds, windows_per_batch: int) -> torch.Tensor:
        """Mask logits of every window, window-major: `(num_windows * B, C, h, w)` at the patch-grid resolution."""
        logits = []
        for start in range(0, len(windows), windows_per_batch):
            chunk = windows[start : start + windows_per_batch]
            crops = torch.cat([padded[:, :, top:bottom, left:right] for top, bottom, left, right in chunk])
            logits.append(self.decode_head(self.get_image_features(crops), class_embeds).logits.float())
        return torch.cat(logits)

    def _averaged_window_scores(self, window_logits, windows, offsets, padded_size, batch_size) -> torch.Tensor:
        """Calibrated scores `sigmoid(upsampled logits) - offsets` of a class range, averaged over overlapping
        windows: `(B, C, *padded_size)`."""
        crop = self.config.crop_size
        scores = window_logits.new_zeros(batch_size, window_logits.shape[1], *padded_size)
        counts = window_logits.new_zeros(1, 1, *padded_size)
        for index, (top, bottom, left, right) in enumerate(windows):
            logits = window_logits[index * batch_size : (index + 1) * batch_size]
            window_scores = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)
            scores[:, :, top:bottom, left:right] += window_scores.sigmoid() - offsets[None, :, None, None]
            counts[:, :, top:bottom, left:right] += 1
        return scores / counts

    def _prepare_windows(self, pixel_values, text_embeds, input_ids, attention_mask, windows_per_batch):
        """Pad to at least one crop, cut the windows and run the model on them (see `sliding_window_scores`)."""
        class_embeds, class_ids = self._class_embeddings(text_embeds, input_ids, attention_mask)
        offsets = self.score_offsets(class_ids, class_embeds.shape[0], pixel_values.device)
        crop, stride = self.config.crop_size, self.config.sliding_window_stride
        height, width = pixel_values.shape[-2:]
        padded = F.pad(pixel_values, (0, max(crop - width, 0), 0, max(crop - height, 0)))
        windows = sliding_windows(padded.shape[-2], padded.shape[-1], crop, stride)
        window_logits = self._window_logits(padded, windows, class_embeds, windows_per_batch)
        return window_logits, windows, offsets, tuple(padded.shape[-2:])

    @torch.no_grad()
    def sliding_window_scores(
        self,
        pixel_values: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        windows_per_batch: int = 4,
    ) -> torch.FloatTensor:
        """
        The reference's test protocol on a batch of equally sized images: square windows of `crop_size` every
        `sliding_window_stride` pixels (the last window flush with the border), calibrated scores
        `sigmoid(pred_masks) - offsets` averaged where windows overlap, then resized (bilinear) to `output_size`.

        Images smaller than the crop on a side are padded (bottom / right, with zeros, i.e. the mean colour after
        normalisation) to one full crop and the padded part of the scores is cut away, so the region-token
        attention mask always sees its full grid of cells.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images, short side usually
                resized to `crop_size` by the image processor.
        Returns:
            `torch.FloatTensor` of shape `(B, C, *output_size)` (or `(B, C, H, W)`).
        """
        height, width = pixel_values.shape[-2:]
        window_logits, windows, offsets, padded_size = self._prepare_windows(
            pixel_values, text_embeds, input_ids, attention_mask, windows_per_batch
        )
        scores = self._averaged_window_scores(window_logits, windows, offsets, padded_size, pixel_values.shape[0])
        scores = scores[:, :, :height, :width]
        if output_size is not None and tuple(output_size) != (height, width):
            scores = F.interpolate(scores, size=tuple(output_size), mode="bilinear", align_corners=False)
        return scores

    @torch.no_grad()
    def sliding_window_labels(
        self,
        pixel_values: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_sizes: list[tuple[int, int]] | None = None,
        windows_per_batch: int = 4,
        classes_per_chunk: int = 32,
    ) -> list[torch.LongTensor]:
        """
        The arg-max of [`sliding_window_scores`] (resized to each image's `output_sizes[i]`), computed
        `classes_per_chunk` classes at a time with a running maximum, so memory does not grow with the number of
        classes. Ties resolve to the lowest class index, as `argmax` does.

        Returns:
            One `torch.LongTensor` of shape `output_sizes[i]` (or `(H, W)`) per image.
        """
        batch_size, _, height, width = pixel_values.shape
        output_sizes = [tuple(size) for size in output_sizes] if output_sizes is not None else [(height, width)] * batch_size
        if len(output_sizes) != batch_size:
            raise ValueError(f"{len(output_sizes)} output sizes for {batch_size} images.")
        window_logits, windows, offsets, padded_size = self._prepare_windows(
            pixel_values, text_embeds, input_ids, attention_mask, windows_per_batch
        )
        best_scores = [window_logits.new_full(size, -math.inf) for size in output_sizes]
        best_labels = [torch.zeros(size, dtype=torch.long, device=window_logits.device) for size in output_sizes]
        for first in range(0, window_logits.shape[1], classes_per_chunk):
            last = min(first + classes_per_chunk, window_logits.shape[1])
            scores = self._averaged_window_scores(
                window_logits[:, first:last], windows, offsets[first:last], padded_size, batch_size
            )[:, :, :height, :width]
            for index, size in enumerate(output_sizes):
                image_scores = scores[index : index + 1]
                if size != (height, width):
                    image_scores = F.interpolate(image_scores, size=size, mode="bilinear", align_corners=False)
                chunk_best, chunk_labels = image_scores[0].max(dim=0)
                better = chunk_best > best_scores[index]
                best_scores[index] = torch.where(better, chunk_best, best_scores[index])
                best_labels[index] = torch.where(better, chunk_labels + first, best_labels[index])
        return best_labels

    @torch.no_grad()
    def segment(
        self,
        pixel_values: torch.FloatTensor | list[torch.FloatTensor],
        original_sizes: list[tuple[int, int]] | None = None,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> list[torch.LongTensor]:
        """
        Label maps for images of any size with the reference protocol ([`sliding_window_labels`]).

        Args:
            pixel_values: a `(B, 3, H, W)` batch or a list of `(3, H_i, W_i)` images (as the image processor
                returns them for mixed sizes).
            original_sizes: `(height, width)` per image to resize the scores to before the arg-max.
        Returns:
            One `torch.LongTensor` of shape `original_sizes[i]` (or the input size) per image: channel indices into
            the classes used (the config's classes unless `text_embeds` / `input_ids` give others).
        """
        images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))
        if original_sizes is not None and len(original_sizes) != len(images):
            raise ValueError(f"{len(original_sizes)} original sizes for {len(images)} images.")
        if input_ids is not None and text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        return [
            self.sliding_window_labels(
                image[None],
                text_embeds=text_embeds,
                output_sizes=[original_sizes[index]] if original_sizes is not None else None,
            )[0]
            for index, image in enumerate(images)
        ]

    # ---- initialisation from CLIP ----------------------------------------------------------------------------

    @classmethod
    def from_clip(
        cls, clip_name_or_path: str | Path | CLIPModel, config: CLIPRCConfig | dict, tokenizer=None, **kwargs
    ) -> "CLIPRCForSemanticSegmentation":
        """
        A CLIP-RC model initialised from a CLIP checkpoint in the Hub's format (e.g. `openai/clip-vit-base-patch16`
        or a local folder of the same layout), as the reference starts training: both towers and projections
        copied, the position table resized to the crop's patch grid (bilinear, class row kept), every region token
        set to `class_embedding + position[0]`. Prompts and decoder are freshly initialised.

        When a tokenizer is given or found beside the CLIP weights, the config's class names are encoded with the
        config's templates and persisted as the model's class embeddings.

        Args:
            clip_name_or_path: Hub id, local folder or an already loaded `CLIPModel`.
            config: the CLIP-RC configuration, or a dict of its fields; `vision_config`, `text_config` and
                `projection_dim` come from the CLIP checkpoint (a dict is validated against those, so a config for
                a CLIP other than ViT-B/16 needs no tower settings of its own).
            kwargs: passed to `CLIPModel.from_pretrained`.
        """
        clip = clip_name_or_path
        if not isinstance(clip, CLIPModel):
            clip = CLIPModel.from_pretrained(clip_name_or_path, **kwargs)
        config = CLIPRCConfig.from_dict(
            {
                **(config.to_dict() if isinstance(config, CLIPRCConfig) else config),
                "vision_config": clip.config.vision_config.to_dict(),
                "text_config": clip.config.text_config.to_dict(),
                "projection_dim": clip.config.projection_dim,
            }
        )
        model = cls(config)
        clip_state = clip.state_dict()
        state = {
            name: tensor
            for name, tensor in clip_state.items()
            if name.startswith(("vision_model.", "text_model.", "visual_projection.", "text_projection."))
            and not name.endswith("position_ids")
        }
        position_key = "vision_model.embeddings.position_embedding.weight"
        state[position_key] = resize_position_table(state[position_key], config.patch_grid_size)
        model_state = model.state_dict()
        unknown = [name for name in state if name not in model_state]
        if unknown:
            raise ValueError(f"CLIP weights with no place in CLIP-RC: {unknown[:10]}")
        missing_clip = [
            name
            for name in model_state
            if name.startswith(("vision_model.embeddings", "vision_model.encoder", "text_model."))
            and name not in state
            and not name.endswith("position_ids")
        ]
        if missing_clip:
            raise ValueError(f"The CLIP checkpoint lacks {missing_clip[:10]}")
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            embeddings = model.vision_model.embeddings
            region_init = embeddings.class_embedding + embeddings.position_embedding.weight[0]
            model.vision_model.region_tokens.copy_(region_init.expand_as(model.vision_model.region_tokens))

        if tokenizer is None and not isinstance(clip_name_or_path, CLIPModel):
            tokenizer = _try_load_tokenizer(clip_name_or_path)
        if tokenizer is not None:
            model.set_class_embeddings(
                model.encode_text(**tokenize_class_prompts(tokenizer, config.class_names, config.prompt_templates))
            )
        else:
            source = "the given CLIPModel" if isinstance(clip_name_or_path, CLIPModel) else str(clip_name_or_path)
            logger.warning(f"No tokenizer given or found beside {source}: class embeddings are not set; call set_class_embeddings().")
        return model


def resize_position_table(positions: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize a `(1 + g*g, D)` position table to `(1 + grid_size**2, D)`: bilinear (align_corners=False) on the
    patch rows, class row kept."""
    source_grid = int(math.isqrt(positions.shape[0] - 1))
    if source_grid == grid_size:
        return positions
    patch_positions = positions[1:].reshape(1, source_grid, source_grid, -1).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(patch_positions.float(), size=(grid_size, grid_size), mode="bilinear", align_corners=False)
    patch_positions = patch_positions.flatten(2).transpose(1, 2)[0].to(positions.dtype)
    return torch.cat([positions[:1], patch_positions], dim=0)


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """`(top, bottom, left, right)` of the reference's sliding windows over an image of at least one crop."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            windows.append((max(bottom - crop, 0), bottom, max(right - crop, 0), right))
    return windows


def tokenize_class_prompts(tokenizer, class_names: list[str], templates: list[str]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of shape `(C, T, L)`: every class name in every template."""
    prompts = [template.format(name) for name in class_names for template in templates]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    shape = (len(class_names), len(templates), -1)
    return {"input_ids": encoded["input_ids"].view(shape), "attention_mask": encoded["attention_mask"].view(shape)}


def _try_load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


__all__ = [
    "CLIPRCForSemanticSegmentation",
    "CLIPRCPreTrainedModel",
    "CLIPRCSemanticSegmenterOutput",
    "CLIPRCImageFeatures",
    "build_region_attention_mask",
    "sliding_windows",
    "resize_position_table",
    "tokenize_class_prompts",
]
