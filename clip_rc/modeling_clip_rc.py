"""PyTorch CLIP-RC: CLIP with deep visual prompts, a Region-Level Bridge and a region-alignment decoder."""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPTextModel,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import logging
from transformers.utils.generic import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_clip_rc import CLIPRCConfig, check_class_names
from .fused_ops import blocked_attention, fast_dropout, upsampled_mask_losses
from .image_processing_clip_rc import CLIPRCImageProcessor
from .onednn import applies as onednn_applies
from .onednn import linear


logger = logging.get_logger(__name__)


@dataclass
class CLIPRCModelOutput(ModelOutput):
    """
    Output of [`CLIPRCModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + P + N + R, hidden_size)`):
            The image tower's tokens `[class, prompts, patches, regions]` after the prompt norm (all but the region
            tokens) and `post_layernorm`.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, E)`):
            The image's global embedding: the projected class token, L2-normalised.
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, E, height / patch_size, width / patch_size)`):
            One projected, L2-normalised embedding per patch.
        region_embeds (`torch.FloatTensor` of shape `(batch_size, E, region_grid_size, region_grid_size)`):
            The projected, L2-normalised region tokens of the Region-Level Bridge, one per grid cell, row-major.
        text_embeds (`torch.FloatTensor` of shape `(num_classes, E)`, *optional*):
            L2-normalised class embeddings of the given `input_ids` (see [`CLIPRCModel.encode_class_prompts`]).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The image tower's input to its first layer and the output of every layer, each of shape
            `(batch_size, 1 + P + N + R, hidden_size)`; with `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Per image-tower layer, the attention probabilities `(batch_size, num_heads, 1 + P + N + R, 1 + P + N + R)`;
            with `output_attentions=True` and eager attention.
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CLIPRCSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`CLIPRCForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the weighted sum of `loss_dict`, when labels are given.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*): the weighted terms `loss_focal`, `loss_dice`,
            `loss_recovery_query` and `loss_recovery_pixel`.
        logits (`torch.FloatTensor` of shape `(num_crops, num_classes, height / patch_size, width / patch_size)`):
            Raw (pre-sigmoid) mask logits of every input crop (an image, or one sliding window of an image cut by
            [`CLIPRCImageProcessor`]) for the classes given to the head, at the patch-grid resolution. Bilinear
            upsampling (align_corners=False) to the crop size gives the reference's `pred_masks`.
        class_ids (`torch.LongTensor` of shape `(num_classes,)`, *optional*): for each channel of `logits`, its id in
            the config's class list; set when the head saw the config's classes (the persisted class embeddings, or
            labels).
        score_offsets (`torch.FloatTensor` of shape `(num_classes,)`): subtracted from the sigmoid scores of each
            channel before the arg-max (the reference's calibration of the classes the head was trained on; zeros for
            classes given at run time).
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`): the `(height, width)` of each image the crops
            were cut from (each input crop is its own image when the processor cut no windows); what
            [`~CLIPRCImageProcessor.post_process_semantic_segmentation`] reassembles.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*), attentions (`tuple(torch.FloatTensor)`, *optional*):
            The image tower's, see [`CLIPRCModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    class_ids: torch.LongTensor | None = None
    score_offsets: torch.FloatTensor | None = None
    image_sizes: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _reject_unknown_kwargs(kwargs: dict, method: str):
    """A misspelled keyword would otherwise flow silently into the layers."""
    unknown = sorted(set(kwargs) - set(TransformersKwargs.__annotations__))
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword arguments {unknown}.")


def build_region_attention_mask(
    num_prompt_tokens: int, grid_height: int, grid_width: int, region_grid_size: int, device=None
) -> torch.BoolTensor:
    """
    The Region-Level Bridge's attention pattern over the sequence `[class, prompts, patches, regions]`.

    Class, prompt and patch tokens see each other freely and see no region token, except that each patch sees the
    region token of its own cell (the patch grid cut into `region_grid_size`² equal cells). A region token sees the
    patches of its cell and itself only. Built from per-token cell ids with broadcasting, so that it traces with
    symbolic grid sizes (`torch.export`).

    Returns:
        `torch.BoolTensor` of shape `(sequence_length, sequence_length)`, `True` where the query (row) may attend to
        the key (column).
    """
    rows = torch.arange(grid_height, device=device) // (grid_height // region_grid_size)
    cols = torch.arange(grid_width, device=device) // (grid_width // region_grid_size)
    patch_cells = (rows[:, None] * region_grid_size + cols[None, :]).flatten()
    num_regions = region_grid_size**2
    # Cell of every token: -1 for the class and prompt tokens, which belong to no cell.
    cells = torch.cat(
        [
            torch.full((1 + num_prompt_tokens,), -1, dtype=torch.long, device=device),
            patch_cells,
            torch.arange(num_regions, device=device),
        ]
    )
    is_region = torch.zeros_like(cells, dtype=torch.bool)
    is_region[-num_regions:] = True
    same_cell = (cells[:, None] == cells[None, :]) & (cells[:, None] >= 0)
    both_outside_regions = ~is_region[:, None] & ~is_region[None, :]
    # Region rows / columns: only the same cell; two region tokens share a cell only with themselves.
    return both_outside_regions | (same_cell & (is_region[:, None] | is_region[None, :]))


class CLIPRCLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU product goes through [`~onednn.linear`] (oneDNN where it is faster than MKL); the
    same parameters, initialisation and results up to float rounding."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, self.weight, self.bias)


def use_clip_rc_linears(module: nn.Module) -> nn.Module:
    """Make every plain `nn.Linear` inside `module` (transformers' CLIP layers) a [`CLIPRCLinear`], in place: a class
    change only, so parameters, hooks and state stay as they are."""
    for submodule in module.modules():
        if type(submodule) is nn.Linear:
            submodule.__class__ = CLIPRCLinear
    return module


# Per-head attention scores (queries x keys) from which [`~fused_ops.blocked_attention`] pays for its loop over heads
# and blocks: below, SDPA's one batched kernel is faster (6x for a tiny 72-token tower; blocked is 1.1-1.3x faster
# from 512 x 512 on an AMD Zen 5).
MIN_BLOCKED_ATTENTION_SCORES = 2**18


def uses_blocked_attention(
    attention: nn.Module, num_queries: int, num_keys: int, *tensors: torch.Tensor | None
) -> bool:
    """Whether an attention module (with `config`, `training`, `dropout`) configured for SDPA computes its
    `num_queries` x `num_keys` attention through [`~fused_ops.blocked_attention`] instead, when the maps are large:
    on fp32 CPU tensors where oneDNN's products beat the default kernels (CPU SDPA's are MKL's), in inference and
    training alike; and in CPU training with attention dropout on any processor, where CPU SDPA would materialise the
    attention maps for the dropout. Boolean masks stay with SDPA."""
    if attention.config._attn_implementation != "sdpa":
        return False
    applies = onednn_applies(*tensors) or (
        attention.training
        and attention.dropout > 0
        and torch.is_grad_enabled()
        and all(tensor is None or (tensor.device.type == "cpu" and tensor.is_floating_point()) for tensor in tensors)
    )
    # The sizes last: traced and compiled graphs (which never take this path) get no guard on them.
    return applies and num_queries * num_keys >= MIN_BLOCKED_ATTENTION_SCORES


def blocked_attention_output(attention: nn.Module, query_states, key_states, value_states, additive_mask=None):
    """[`~fused_ops.blocked_attention`] of `(batch, heads, length, head_dim)` states with the module's scale and, in
    training, its dropout: `(batch, query_length, heads * head_dim)`, the output projection's input."""
    dropout = attention.dropout if attention.training else 0.0
    attended = blocked_attention(query_states, key_states, value_states, attention.scale, dropout, additive_mask)
    return attended.transpose(1, 2).flatten(2)


class CLIPRCAttention(CLIPAttention):
    """transformers' CLIP attention, through [`~fused_ops.blocked_attention`] where [`uses_blocked_attention`] says so
    (the image tower's 1141-token self-attention: 1.4-1.6x CPU SDPA's rate at inference, 1.2-1.3x in training, on an
    AMD Zen 5)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tokens = hidden_states.shape[1]
        if not uses_blocked_attention(self, num_tokens, num_tokens, hidden_states, attention_mask):
            return super().forward(hidden_states, attention_mask, **kwargs)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        queries, keys, values = (
            projection(hidden_states).view(hidden_shape).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(blocked_attention_output(self, queries, keys, values, attention_mask)), None


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
        patch_positions = positions[1:].reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        # Bilinear resizing to the same size is the identity, so the training resolution needs no branch (a branch on
        # the grid size would not trace with symbolic sizes).
        patch_positions = F.interpolate(
            patch_positions, size=(grid_height, grid_width), mode="bilinear", align_corners=False
        )
        patch_positions = patch_positions.flatten(2).transpose(1, 2)
        # The reference (after ZegCLIP/DenseCLIP) adds class_embedding to the class position row, so the class token
        # enters as 2 * class_embedding + position[0]; trained checkpoints depend on it.
        class_token = (2 * self.class_embedding + positions[0]).expand(batch_size, 1, -1)
        return torch.cat([class_token, patch_embeds + patch_positions], dim=1)


class CLIPRCQuickGELU(nn.Module):
    """
    CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`, as `silu(1.702 x) / 1.702`. Transformers' `QuickGELUActivation`
    allocates three fresh tensors of the 4x wide feed-forward activations per layer; on CPU their page faults cost
    ~10 % of a crop's inference at 171 classes. Without autograd this one works in place on the feed-forward's own
    fresh activations. Equal to within fp32 rounding (a few 1e-7 relative).
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.requires_grad:
            return F.silu(hidden_states * 1.702) / 1.702
        return F.silu(hidden_states.mul_(1.702), inplace=True).div_(1.702)


class CLIPRCVisionTransformer(nn.Module):
    """
    CLIP's image transformer with deep visual prompts and the Region-Level Bridge. Module and weight names follow
    transformers' `CLIPVisionTransformer`, so CLIP weights in the Hub's format load by name.
    """

    # Read by transformers' attention dispatch of composite models (the tower's CLIP layers support SDPA).
    _supports_sdpa = True

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        embed_dim = vision_config.hidden_size
        self.num_prompt_tokens = config.num_prompt_tokens
        self.region_grid_size = config.region_grid_size
        self.num_region_tokens = config.num_region_tokens

        self.embeddings = CLIPRCVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(embed_dim, eps=vision_config.layer_norm_eps)
        self.encoder = use_clip_rc_linears(CLIPEncoder(vision_config))
        # The image tower runs per crop (the text tower once per class set): its attention and QuickGELU are worth
        # faster kernels.
        for layer in self.encoder.layers:
            layer.self_attn.__class__ = CLIPRCAttention  # the same module, with a faster path on CPU
            if vision_config.hidden_act == "quick_gelu":
                layer.mlp.activation_fn = CLIPRCQuickGELU()
        self.post_layernorm = nn.LayerNorm(embed_dim, eps=vision_config.layer_norm_eps)

        self.region_tokens = nn.Parameter(torch.zeros(self.num_region_tokens, embed_dim))
        self.prompt_embeddings = nn.Parameter(torch.zeros(1, config.num_prompt_tokens, embed_dim))
        self.deep_prompt_embeddings = nn.Parameter(
            torch.zeros(vision_config.num_hidden_layers - 1, config.num_prompt_tokens, embed_dim)
        )
        self.prompt_proj = CLIPRCLinear(embed_dim, embed_dim)
        self.prompt_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)

    def attention_mask(self, grid_height: int, grid_width: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """The region attention mask `(1, 1, S, S)`, additive (0 / dtype minimum) in the attention's dtype: eager
        attention takes no other form, and CPU SDPA runs ~4 % faster with it than with a boolean mask. Rebuilt per
        call (about a million elements, once per forward pass), so that it follows symbolic sizes under
        `torch.export`."""
        allowed = build_region_attention_mask(
            self.num_prompt_tokens, grid_height, grid_width, self.region_grid_size, device=hidden_states.device
        )
        dtype, device_type = hidden_states.dtype, hidden_states.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=hidden_states.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def forward(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]) -> torch.FloatTensor:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): height and width multiples
                of `patch_size * region_grid_size`.
        Returns:
            `torch.FloatTensor` of shape `(batch_size, 1 + P + N + R, hidden_size)` after the prompt norm (all but the
            region tokens) and `post_layernorm`.
        """
        patch_size = self.embeddings.patch_size
        height, width = pixel_values.shape[-2:]
        cell = patch_size * self.region_grid_size
        if not torch.compiler.is_compiling() and (height % cell or width % cell):
            raise ValueError(
                f"pixel_values of size {height}x{width}: height and width must be multiples of patch_size x "
                f"region_grid_size = {cell} so that every region cell holds whole patches; the image processor cuts "
                "images into crops of the model's crop size."
            )
        batch_size = pixel_values.shape[0]

        hidden_states = self.embeddings(pixel_values)
        region_tokens = self.region_tokens.to(hidden_states.dtype).expand(batch_size, -1, -1)
        hidden_states = self.pre_layrnorm(torch.cat([hidden_states, region_tokens], dim=1))
        attention_mask = self.attention_mask(height // patch_size, width // patch_size, hidden_states)

        # All prompt projections at once: row 0 feeds layer 0, row i replaces the prompt slots before layer i.
        prompts = torch.cat([self.prompt_embeddings, self.deep_prompt_embeddings], dim=0)
        prompts = self.prompt_dropout(self.prompt_proj(prompts)).to(hidden_states.dtype)
        num_prompts = self.num_prompt_tokens
        for index, layer in enumerate(self.encoder.layers):
            layer_prompts = prompts[index].expand(batch_size, -1, -1)
            after_prompts = hidden_states[:, 1:] if index == 0 else hidden_states[:, 1 + num_prompts :]
            hidden_states = torch.cat([hidden_states[:, :1], layer_prompts, after_prompts], dim=1)
            hidden_states = layer(hidden_states, attention_mask, **kwargs)

        region_start = hidden_states.shape[1] - self.num_region_tokens
        hidden_states = torch.cat(
            [self.prompt_norm(hidden_states[:, :region_start]), hidden_states[:, region_start:]], dim=1
        )
        return self.post_layernorm(hidden_states)


class CLIPRCCrossAttention(nn.Module):
    """Multi-head attention of queries over a separate memory, with separate q / k / v projections, through the
    attention implementation of the config (SDPA by default, eager on request)."""

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        self.config = config
        hidden_size = config.decoder_hidden_size
        self.num_heads = config.decoder_num_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.decoder_attention_dropout
        self.is_causal = False
        self.q = CLIPRCLinear(hidden_size, hidden_size)
        self.k = CLIPRCLinear(hidden_size, hidden_size)
        self.v = CLIPRCLinear(hidden_size, hidden_size)
        self.proj = CLIPRCLinear(hidden_size, hidden_size)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value states `(batch, heads, num_keys, head_dim)` of `memory` (batch, num_keys, hidden)."""
        batch_size = memory.shape[0]
        key_states = self.k(memory).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = self.v(memory).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        return key_states, value_states

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_states: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`queries` (batch, num_queries, hidden), `memory` (batch, num_keys, hidden) -> (batch, num_queries, hidden)
        and, with eager attention, the attention probabilities (batch, heads, num_queries, num_keys).
        `memory_states`: `project_memory(memory)`, when several calls share it."""
        batch_size, num_queries, hidden_size = queries.shape
        query_states = self.q(queries).view(batch_size, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        key_states, value_states = memory_states if memory_states is not None else self.project_memory(memory)
        if uses_blocked_attention(self, num_queries, key_states.shape[2], query_states, key_states, value_states):
            return self.proj(blocked_attention_output(self, query_states, key_states, value_states)), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attended, attention_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            None,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.proj(attended.reshape(batch_size, num_queries, hidden_size)), attention_weights


class CLIPRCDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training masks come from [`~fused_ops.fast_dropout`] (several times faster than
    `bernoulli_`, redrawn in the backward pass instead of kept)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return fast_dropout(inputs, self.p, self.training)


# Queries per chunk of a decoder layer run without autograd (see `CLIPRCDecoderLayer.forward`).
DECODER_QUERIES_PER_CHUNK = 1024


class CLIPRCDecoderLayer(GradientCheckpointingLayer):
    """
    A post-norm transformer decoder layer without self-attention: cross-attention, then a ReLU feed-forward.

    With gradient checkpointing enabled it keeps only its inputs for the backward pass (its attention and 4x wide
    feed-forward activations of 16 x C queries are recomputed, replaying the same dropout masks).
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        hidden_size = config.decoder_hidden_size
        self.multihead_attn = CLIPRCCrossAttention(config)
        self.linear1 = CLIPRCLinear(hidden_size, config.decoder_intermediate_size)
        self.linear2 = CLIPRCLinear(config.decoder_intermediate_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm3 = nn.LayerNorm(hidden_size)
        self.dropout = CLIPRCDropout(config.decoder_dropout)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`hidden_states` (batch, num_queries, hidden) attend to `memory` (batch, num_keys, hidden). Without autograd,
        many queries go through in chunks of `DECODER_QUERIES_PER_CHUNK` sharing the memory's key and value states:
        each query is independent of the others given the memory, and a chunk's intermediates (the 4x wide
        feed-forward activations of 16 x C queries) stay in the processor's caches."""
        # Traced graphs (torch.export, ONNX) take one path, so that they accept any number of classes.
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or hidden_states.shape[1] <= DECODER_QUERIES_PER_CHUNK
        ):
            return self._forward_queries(hidden_states, memory)
        memory_states = self.multihead_attn.project_memory(memory)
        outputs = torch.empty_like(hidden_states)
        for start in range(0, hidden_states.shape[1], DECODER_QUERIES_PER_CHUNK):
            chunk = slice(start, start + DECODER_QUERIES_PER_CHUNK)
            outputs[:, chunk] = self._forward_queries(hidden_states[:, chunk], memory, memory_states)
        return outputs

    def _forward_queries(self, hidden_states, memory, memory_states=None) -> torch.Tensor:
        attended, _ = self.multihead_attn(hidden_states, memory, memory_states)
        hidden_states = self.norm2(hidden_states + self.dropout(attended))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(hidden_states), inplace=True)))
        return self.norm3(hidden_states + self.dropout(feed_forward))


class CLIPRCRecoveryDecoder(nn.Module):
    """Maps the decoder's outputs back to its inputs (region-text queries and patch tokens) for the recovery loss."""

    def __init__(self, config: CLIPRCConfig):
        super().__init__()
        hidden_size, embed_dim = config.decoder_hidden_size, config.projection_dim
        self.query_in = CLIPRCLinear(hidden_size, hidden_size)
        self.pixel_in = CLIPRCLinear(hidden_size, hidden_size)
        self.query_layers = nn.ModuleList([CLIPRCDecoderLayer(config) for _ in range(config.recovery_num_layers)])
        self.pixel_layers = nn.ModuleList([CLIPRCDecoderLayer(config) for _ in range(config.recovery_num_layers)])
        self.query_out = CLIPRCLinear(hidden_size, 2 * embed_dim)
        self.pixel_out = CLIPRCLinear(hidden_size, embed_dim)

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
        region_text_queries (`(B, R*C, 2E)`): the decoder's input queries before `q_proj`, region-major (index
            r*C + c); with the recovery branch.
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
        self.q_proj = CLIPRCLinear(2 * embed_dim, hidden_size)
        self.lateral_proj = CLIPRCLinear(3 * embed_dim, hidden_size)
        self.decoder_q = nn.ModuleList([CLIPRCDecoderLayer(config) for _ in range(config.decoder_num_layers)])
        self.decoder_v = nn.ModuleList([CLIPRCDecoderLayer(config) for _ in range(config.decoder_num_layers)])
        self.recovery = CLIPRCRecoveryDecoder(config)

    def forward(
        self, image_features: CLIPRCModelOutput, text_embeds: torch.Tensor, compute_recovery: bool = False
    ) -> CLIPRCDecoderOutput:
        """
        Args:
            image_features: normalised `image_embeds` (B, E), `patch_embeds` (B, E, h, w) and `region_embeds`
                (B, E, g, g) of [`CLIPRCModel`].
            text_embeds (`torch.FloatTensor` of shape `(C, E)`): normalised class embeddings.
            compute_recovery: also run the recovery branch (needed by the recovery loss).
        """
        # The head computes in its weights' dtype (autocast still lowers its matrix products), whatever the image
        # tower's output dtype.
        dtype = self.q_proj.weight.dtype
        global_embeds = image_features.image_embeds.to(dtype)
        batch_size, _, grid_height, grid_width = image_features.patch_embeds.shape
        region_embeds = image_features.region_embeds.to(dtype)
        # A fresh copy (C x E, small): matmul kernels round differently on unaligned memory, such as a buffer read from
        # a safetensors file, and the logits must not depend on where the caller's tensor lives.
        text_embeds = text_embeds.to(dtype, copy=True)

        queries, region_text = self._region_text_queries(region_embeds, global_embeds, text_embeds)
        region_text_queries = None
        if compute_recovery:  # the recovery loss's target: the unprojected queries
            text_copies = text_embeds.expand(*region_text.shape[:3], text_embeds.shape[-1])
            region_text_queries = torch.cat([region_text, text_copies], dim=-1).flatten(1, 2)

        pixels = self.lateral_proj(self._pixel_inputs(image_features, region_embeds, global_embeds, dtype))
        for query_layer, pixel_layer in zip(self.decoder_q, self.decoder_v):
            queries, pixels = query_layer(queries, pixels), pixel_layer(pixels, queries)

        logits = self._class_logits(queries, pixels, num_regions=region_text.shape[1])
        logits = logits.view(batch_size, text_embeds.shape[0], grid_height, grid_width)
        recovered_queries = recovered_pixels = None
        if compute_recovery:
            recovered_queries, recovered_pixels = self.recovery(queries, pixels)
        return CLIPRCDecoderOutput(
            logits=logits,
            region_text_queries=region_text_queries,
            recovered_queries=recovered_queries,
            recovered_pixels=recovered_pixels,
        )

    def _region_text_queries(
        self, region_embeds: torch.Tensor, global_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Query (r, c) = q_proj([(region_r + global) * text_c, text_c]), flattened region-major: the queries
        `(B, R*C, D)` and the region-text products `(B, R, C, E)`. The text half of the projection is the same for
        every region: computed once per class, not per query.
        """
        embed_dim = text_embeds.shape[-1]
        region_tokens = region_embeds.flatten(2).transpose(1, 2)
        region_context = (region_tokens + global_embeds[:, None, :])[:, :, None, :]
        region_text = region_context * text_embeds[None, None]
        # Contiguous copies of the weight's column halves (dense weights take the fast product kernels).
        region_weight, text_weight = (half.contiguous() for half in self.q_proj.weight.split(embed_dim, dim=1))
        text_projection = linear(text_embeds, text_weight, self.q_proj.bias)
        queries = linear(region_text, region_weight) + text_projection
        return queries.flatten(1, 2), region_text

    @staticmethod
    def _pixel_inputs(
        image_features: CLIPRCModelOutput, region_embeds: torch.Tensor, global_embeds: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Each pixel token's decoder input `(B, h*w, 3E)`: its region's embedding (bilinearly upsampled), the global
        embedding and its own patch embedding."""
        grid_height, grid_width = image_features.patch_embeds.shape[-2:]
        patch_tokens = image_features.patch_embeds.flatten(2).transpose(1, 2).to(dtype)
        region_map = F.interpolate(region_embeds, size=(grid_height, grid_width), mode="bilinear", align_corners=False)
        global_tokens = global_embeds[:, None, :].expand(-1, grid_height * grid_width, -1)
        return torch.cat([region_map.flatten(2).transpose(1, 2), global_tokens, patch_tokens], dim=-1)

    @staticmethod
    def _class_logits(queries: torch.Tensor, pixels: torch.Tensor, num_regions: int) -> torch.Tensor:
        """
        Class-pixel logits `(B, C, h*w)` from the decoded queries `(B, R*C, D)` and pixels `(B, h*w, D)`.

        Averaging the R region copies of a class's mask equals one product with the averaged query (linearity).
        The product runs in (at least) fp32 also under autocast (1 GFLOP at 1000 classes): with logits rounded to
        bf16's 8 bits, which classes reach the sigmoid's saturation, and so the label maps, would change.
        """
        batch_size = queries.shape[0]
        class_queries = queries.view(batch_size, num_regions, -1, queries.shape[-1]).mean(dim=1)
        device_type = pixels.device.type
        full_precision = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with full_precision:
            dtype = torch.promote_types(pixels.dtype, torch.float32)
            return class_queries.to(dtype) @ pixels.to(dtype).transpose(1, 2)


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
    _supports_flash_attn = False
    _no_split_modules = ["CLIPEncoderLayer", "CLIPRCDecoderLayer"]
    _can_record_outputs = {"hidden_states": CLIPEncoderLayer, "attentions": CLIPAttention}

    @classmethod
    def is_custom_code(cls) -> bool:
        # Custom code makes `initialize_weights` skip every module without parameters of its own, which would skip the
        # CLIP text tower's attention and MLP initialisation when weights are missing (but not when the model is
        # built). That shortcut is for `_init_weights` that bypass `transformers.initialization`; this one does not.
        return False

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


class CLIPRCModel(CLIPRCPreTrainedModel):
    """
    The CLIP-RC base model: CLIP's image tower with deep visual prompts and the Region-Level Bridge of region tokens,
    CLIP's text tower, and both projections into the joint embedding space. It returns the normalised global, patch
    and region embeddings the decode head of [`CLIPRCForSemanticSegmentation`] reads, and the image tower's hidden
    states and attentions.
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__(config)
        # The towers' CLIP layers read their attention kernel from the sub-configs; one set for a tower alone wins.
        for sub_config in (config.vision_config, config.text_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation = config._attn_implementation
        self.vision_model = CLIPRCVisionTransformer(config)
        self.visual_projection = CLIPRCLinear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_model = use_clip_rc_linears(CLIPTextModel._from_config(config.text_config))
        self.text_projection = CLIPRCLinear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding, as for transformers' CLIP models."""
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.embeddings.token_embedding = value

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """
        The prompted image tower, as transformers' CLIP returns it: `last_hidden_state` (B, 1 + P + N + R, D) and
        `pooler_output` (B, E), the projected (not normalised) class token; `hidden_states` / `attentions` on request.
        """
        outputs = self(pixel_values=pixel_values, return_dict=True, **kwargs)
        pooled = self.visual_projection(outputs.last_hidden_state[:, 0])
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """CLIP's text tower on `input_ids` (N, L): `last_hidden_state` and `pooler_output` (N, E), the projected (not
        normalised) end-of-text token, as transformers' `CLIPModel.get_text_features` returns them."""
        _reject_unknown_kwargs(kwargs, "get_text_features")
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def encode_class_prompts(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """
        Class embeddings from tokenized class prompts (as [`CLIPRCProcessor`] returns them for class names).

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
        flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
        flat_mask = attention_mask.reshape(flat_ids.shape) if attention_mask is not None else None
        text_embeds = F.normalize(self.get_text_features(flat_ids, flat_mask).pooler_output, dim=-1)
        if input_ids.dim() == 3:
            text_embeds = text_embeds.view(input_ids.shape[0], input_ids.shape[1], -1).mean(dim=1)
            text_embeds = F.normalize(text_embeds, dim=-1)
        return text_embeds

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CLIPRCModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised crops (see [`CLIPRCImageProcessor`]); height and width multiples of
                `patch_size * region_grid_size` (positions are interpolated away from the training crop size).
            input_ids (`torch.LongTensor` of shape `(C, L)` or `(C, T, L)`, *optional*):
                Tokenized class prompts; their class embeddings are returned as `text_embeds`.
            attention_mask (*optional*): the attention mask of `input_ids`.
        """
        _reject_unknown_kwargs(kwargs, "forward")
        last_hidden_state = self.vision_model(pixel_values, **kwargs)
        embeds = F.normalize(self.visual_projection(last_hidden_state), dim=-1)
        batch_size, height, width = pixel_values.shape[0], pixel_values.shape[-2], pixel_values.shape[-1]
        patch_size, grid = self.config.vision_config.patch_size, self.config.region_grid_size
        grid_height, grid_width = height // patch_size, width // patch_size
        first_patch = 1 + self.config.num_prompt_tokens
        patch_embeds = embeds[:, first_patch : first_patch + grid_height * grid_width]
        region_embeds = embeds[:, -self.config.num_region_tokens :]
        text_embeds = self.encode_class_prompts(input_ids, attention_mask) if input_ids is not None else None
        return CLIPRCModelOutput(
            last_hidden_state=last_hidden_state,
            image_embeds=embeds[:, 0],
            patch_embeds=patch_embeds.transpose(1, 2).reshape(batch_size, -1, grid_height, grid_width),
            region_embeds=region_embeds.transpose(1, 2).reshape(batch_size, -1, grid, grid),
            text_embeds=text_embeds,
        )


class CLIPRCForSemanticSegmentation(CLIPRCPreTrainedModel):
    """
    CLIP-RC for zero-shot semantic segmentation: the [`CLIPRCModel`] base model (frozen CLIP towers with prompts and
    region tokens), a region-alignment decode head turning image and class embeddings into one mask per class, and
    the reference's losses. The class embeddings of the config's classes are persisted, so a saved model segments
    without a tokenizer.
    """

    def __init__(self, config: CLIPRCConfig):
        super().__init__(config)
        self.clip_rc = CLIPRCModel(config)
        self.decode_head = CLIPRCDecodeHead(config)
        self.register_buffer("class_embeddings", torch.zeros(config.num_labels, config.projection_dim))
        self.post_init()
        self.freeze_clip()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading materialises fresh parameters (all trainable): apply the reference's frozen set again.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_clip()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the pipelines module that `config.custom_pipelines` names, and an
        `auto_map` entry for `AutoModel` (the base model loads from the same weights)."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {
                **getattr(self.config, "auto_map", {}),
                "AutoModel": "modeling_clip_rc.CLIPRCModel",
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and getattr(self, "_auto_class", None) is not None:
            from .pipelines import CLIPRCSegmentationPipeline

            custom_object_save(CLIPRCSegmentationPipeline, save_directory)

    def freeze_clip(self):
        """Freeze what the reference freezes: both CLIP towers and projections; the region tokens unless
        `config.train_region_tokens`. Prompts, prompt projection, prompt norm and the decode head stay trainable."""
        for name, parameter in self.clip_rc.named_parameters():
            trainable = name.startswith("vision_model.") and (
                "prompt" in name or (name == "vision_model.region_tokens" and self.config.train_region_tokens)
            )
            parameter.requires_grad_(trainable)

    # ---- classes ---------------------------------------------------------------------------------------------

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
        if not bool(torch.isfinite(text_embeds).all()):
            raise ValueError("text_embeds hold non-finite values (NaN or inf).")
        if class_names is not None:
            check_class_names(class_names, field="class_names")
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
            return self.clip_rc.encode_class_prompts(input_ids, attention_mask), None
        # A host sync, skipped under torch.compile / torch.export to keep the graph whole.
        if not torch.compiler.is_compiling() and not bool(self.class_embeddings.abs().sum() > 0):
            raise ValueError(
                "The model has no class embeddings: pass text_embeds or input_ids, or call set_class_embeddings()."
            )
        class_ids = torch.arange(self.class_embeddings.shape[0], device=self.class_embeddings.device)
        return self.class_embeddings, class_ids

    def score_offsets(self, class_ids: torch.Tensor | None, num_classes: int, device) -> torch.Tensor:
        """(C,) values subtracted from the sigmoid scores: `seen_score_bias` on the classes the head was trained on,
        when the channels are the config's classes; zeros for classes given at run time."""
        offsets = torch.zeros(num_classes, device=device)
        if class_ids is not None:
            trained = torch.tensor(self.config.trained_class_ids, device=device)
            offsets = torch.where(torch.isin(class_ids, trained), self.config.seen_score_bias, offsets)
        return offsets

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

    def _head_classes(self, class_embeds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class embeddings and ids the head trains on: the seen classes in the inductive setting, every class
        otherwise."""
        num_labels = self.config.num_labels
        if class_embeds.shape[0] != num_labels:
            raise ValueError(
                f"Training with labels needs the embeddings of the config's {num_labels} classes, got "
                f"{class_embeds.shape[0]}."
            )
        self._validate_labels(labels)
        inductive = self.config.setting == "inductive"
        head_class_ids = self.config.resolved_seen_class_ids if inductive else list(range(num_labels))
        class_ids = torch.tensor(head_class_ids, device=class_embeds.device)
        return class_embeds[class_ids], class_ids

    def _id_lookup(self, class_ids: list[int], device) -> torch.Tensor:
        """A table mapping dataset class ids (and the ignore index) to head channels; other ids map to ignore."""
        ignore_index = self.config.ignore_index
        size = max(self.config.num_labels, ignore_index) + 1
        lookup = torch.full((size,), ignore_index, dtype=torch.long, device=device)
        lookup[torch.tensor(class_ids, dtype=torch.long, device=device)] = torch.arange(len(class_ids), device=device)
        return lookup

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

    def compute_loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        decoder_output: CLIPRCDecoderOutput,
        image_features: CLIPRCModelOutput,
    ) -> dict[str, torch.Tensor]:
        """
        Weighted focal, dice and recovery losses (SPEC §4).

        Args:
            logits (`(B, C, h, w)`): mask logits at the patch-grid resolution; the losses see them upsampled
                (bilinear) to the label size, a few classes at a time (see [`~fused_ops.upsampled_mask_losses`]).
            targets (`(B, H, W)`): head channel ids, `ignore_index` for pixels that supervise nothing (they count
                as negatives of every class in the focal loss).
        """
        config = self.config
        focal, dice, present = upsampled_mask_losses(
            logits, targets, config.ignore_index, config.focal_alpha, config.focal_gamma
        )
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

    def _loss(self, logits, labels, class_ids, decoder_output, image_features) -> dict[str, torch.Tensor]:
        targets = self._id_lookup(class_ids.tolist(), labels.device)[labels.long()]
        if self.config.setting == "transductive":
            targets = self._pseudo_label_unseen(logits, labels, targets)
        return self.compute_loss(logits, targets, decoder_output, image_features)

    # ---- forward ---------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        labels: torch.LongTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CLIPRCSemanticSegmenterOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_crops, 3, height, width)`):
                Normalised crops: the sliding windows [`CLIPRCImageProcessor`] cuts from resized images, or training
                crops; height and width multiples of `patch_size * region_grid_size`.
            labels (`torch.LongTensor` of shape `(num_crops, height, width)`, *optional*):
                Class ids of the config's class list, `ignore_index` (255) for unlabelled pixels. The model applies
                its `setting`: inductive training ignores unseen pixels and gives the head the seen classes only;
                transductive training gives the head every class and pseudo-labels unseen pixels with the arg-max
                unseen class of its own (detached) scores; fully supervised training uses every label.
            text_embeds (`torch.FloatTensor` of shape `(C, E)`, *optional*):
                Normalised class embeddings. With labels, they must be the config's `num_labels` classes.
            input_ids (`torch.LongTensor` of shape `(C, L)` or `(C, T, L)`, *optional*):
                Tokenized class prompts (the processor's `text=class_names`), encoded by the text tower.
            attention_mask (*optional*): the attention mask of `input_ids`.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
                The resized size of each image the processor cut the crops from; passed to the output for
                [`~CLIPRCImageProcessor.post_process_semantic_segmentation`]. Default: every crop is an image.
            Without `text_embeds` and `input_ids`, the persisted embeddings of the config's classes are used.

        Example:

        ```python
        >>> inputs = processor(images=[image], return_tensors="pt")
        >>> outputs = model(**inputs)
        >>> label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        ```
        """
        _reject_unknown_kwargs(kwargs, "forward")
        class_embeds, class_ids = self._class_embeddings(text_embeds, input_ids, attention_mask)
        if labels is not None:
            class_embeds, class_ids = self._head_classes(class_embeds, labels)

        image_features = self.clip_rc(pixel_values=pixel_values, **kwargs)
        decoder_output = self.decode_head(image_features, class_embeds, compute_recovery=labels is not None)
        logits = decoder_output.logits

        loss = loss_dict = None
        if labels is not None:
            loss_dict = self._loss(logits, labels, class_ids, decoder_output, image_features)
            loss = sum(loss_dict.values())

        if image_sizes is None:
            crop_size = torch.tensor(pixel_values.shape[-2:], device=pixel_values.device)
            image_sizes = crop_size.expand(pixel_values.shape[0], 2)
        return CLIPRCSemanticSegmenterOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            class_ids=class_ids,
            score_offsets=self.score_offsets(class_ids, logits.shape[1], logits.device),
            image_sizes=image_sizes,
            hidden_states=image_features.hidden_states,
            attentions=image_features.attentions,
        )

    @torch.no_grad()
    def sliding_window_labels(
        self,
        pixel_values: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """
        Label maps `(B, H, W)` of images already resized and normalised, `(B, 3, H, W)`, by the reference's test
        protocol, for callers that hold tensors rather than images: the sliding windows [`CLIPRCImageProcessor`]
        cuts with this config's crop and stride, the model on every window at once, then
        [`~CLIPRCImageProcessor.post_process_semantic_segmentation`]. Images as files or arrays go through the
        processor instead, which also resizes and normalises them. Classes as in [`~CLIPRCForSemanticSegmentation.forward`].
        """
        image_processor = CLIPRCImageProcessor.from_model_config(self.config)
        height, width = pixel_values.shape[-2:]
        crops = torch.cat(
            [
                torch.from_numpy(
                    image_processor.cut_windows(
                        image.float().cpu().numpy(), image_processor.crop_size, image_processor.sliding_window_stride
                    )
                )
                for image in pixel_values
            ]
        ).to(pixel_values.device, pixel_values.dtype)
        image_sizes = torch.tensor([[height, width]]).expand(pixel_values.shape[0], 2)
        outputs = self(
            pixel_values=crops,
            text_embeds=text_embeds,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_sizes=image_sizes,
        )
        return torch.stack(image_processor.post_process_semantic_segmentation(outputs))

    # ---- initialisation from CLIP ----------------------------------------------------------------------------

    @classmethod
    def from_clip(
        cls, clip_name_or_path: str | Path | CLIPModel, config: CLIPRCConfig | dict, processor=None, **kwargs
    ) -> "CLIPRCForSemanticSegmentation":
        """
        A CLIP-RC model initialised from a CLIP checkpoint in the Hub's format (e.g. `openai/clip-vit-base-patch16`
        or a local folder of the same layout), as the reference starts training: both towers and projections
        copied, the position table resized to the crop's patch grid (bilinear, class row kept), every region token
        set to `class_embedding + position[0]`. Prompts and decoder are freshly initialised.

        Args:
            clip_name_or_path: Hub id, local folder or an already loaded `CLIPModel`.
            config: the CLIP-RC configuration, or a dict of its fields; `vision_config`, `text_config` and
                `projection_dim` come from the CLIP checkpoint (a dict is validated against those, so a config for
                a CLIP other than ViT-B/16 needs no tower settings of its own).
            processor ([`CLIPRCProcessor`], *optional*): when given, the config's class names are encoded with the
                config's templates and persisted as the model's class embeddings (otherwise call
                [`set_class_embeddings`]).
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
        model.clip_rc.load_state_dict(clip_state_dict_for(model.clip_rc, clip), strict=False)
        with torch.no_grad():
            embeddings = model.clip_rc.vision_model.embeddings
            region_init = embeddings.class_embedding + embeddings.position_embedding.weight[0]
            region_tokens = model.clip_rc.vision_model.region_tokens
            region_tokens.copy_(region_init.expand_as(region_tokens))
        if processor is not None:
            prompts = processor.tokenize_class_names(config.class_names, config.prompt_templates, return_tensors="pt")
            model.set_class_embeddings(
                model.clip_rc.encode_class_prompts(prompts["input_ids"], prompts["attention_mask"])
            )
        else:
            logger.info("No processor given to from_clip: class embeddings are not set; call set_class_embeddings().")
        return model


def clip_state_dict_for(base_model: CLIPRCModel, clip: CLIPModel) -> dict[str, torch.Tensor]:
    """The weights of a `CLIPModel` renamed and resized for `base_model`: both towers and projections, the position
    table resized to the crop's patch grid. Raises when a CLIP weight has no place or a tower weight is missing."""
    state = {
        name: tensor
        for name, tensor in clip.state_dict().items()
        if name.startswith(("vision_model.", "text_model.", "visual_projection.", "text_projection."))
        and not name.endswith("position_ids")
    }
    position_key = "vision_model.embeddings.position_embedding.weight"
    state[position_key] = resize_position_table(state[position_key], base_model.config.patch_grid_size)
    model_state = base_model.state_dict()
    unknown = [name for name in state if name not in model_state]
    if unknown:
        raise ValueError(f"CLIP weights with no place in CLIP-RC: {unknown[:10]}")
    missing = [
        name
        for name in model_state
        if name.startswith(("vision_model.embeddings", "vision_model.encoder", "text_model."))
        and name not in state
        and not name.endswith("position_ids")
    ]
    if missing:
        raise ValueError(f"The CLIP checkpoint lacks {missing[:10]}")
    return state


def resize_position_table(positions: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize a `(1 + g*g, D)` position table to `(1 + grid_size**2, D)`: bilinear (align_corners=False) on the
    patch rows, class row kept."""
    source_grid = int(math.isqrt(positions.shape[0] - 1))
    if source_grid == grid_size:
        return positions
    patch_positions = positions[1:].reshape(1, source_grid, source_grid, -1).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(
        patch_positions.float(), size=(grid_size, grid_size), mode="bilinear", align_corners=False
    )
    patch_positions = patch_positions.flatten(2).transpose(1, 2)[0].to(positions.dtype)
    return torch.cat([positions[:1], patch_positions], dim=0)


__all__ = [
    "CLIPRCForSemanticSegmentation",
    "CLIPRCModel",
    "CLIPRCModelOutput",
    "CLIPRCPreTrainedModel",
    "CLIPRCSemanticSegmenterOutput",
    "build_region_attention_mask",
    "resize_position_table",
]
