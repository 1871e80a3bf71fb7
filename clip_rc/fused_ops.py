"""
Memory-lean autograd functions of CLIP-RC, each equal (up to float rounding) to the plain computation it replaces,
with a hand-written backward pass that recomputes its large intermediates chunk by chunk:

- [`upsampled_mask_losses`]: the sigmoid focal and dice losses of every (image, class) mask on the logits upsampled
  to the label size. The plain computation keeps several full-resolution tensors per class for the backward pass
  (156 classes x 512 x 512 floats each at COCO-Stuff size); here a few classes at a time are upsampled, scored and
  dropped, forward and backward, so the full-resolution work stays in the processor's caches.
- [`blocked_attention`]: softmax attention, with an additive mask and dropout on the probabilities (as the
  reference's decoder trains), per head and block of queries, recomputed in the backward pass (as flash attention
  does), the dropout masks drawn from a counter-based generator so that the backward pass replays them. CPU SDPA
  does dropout only by materialising the (heads, queries, keys) maps, and runs its products through MKL's kernels;
  here the products read dense rows, the layout of [`~onednn.linear`]'s oneDNN kernel (2-3x MKL's rate on AMD's
  Zen 5), all but the keys' and values' gradients. Inference takes the same forward pass.
- [`fast_dropout`]: dropout with the same fast, replayable masks (the decoder's activations).
"""

import math

import torch
import torch.nn.functional as F

from .onednn import linear


__all__ = ["blocked_attention", "fast_dropout", "upsampled_mask_losses"]

# Full-resolution elements (per intermediate tensor) of one chunk of classes of the mask losses: 1 MB in fp32, a
# class of a 512 x 512 label map per chunk.
MASK_LOSS_ELEMENTS_PER_CHUNK = 2**18
# Attention scores of one head's block of queries: 2 MB in fp32 (at least 64 queries, for the products' efficiency).
ATTENTION_SCORES_PER_BLOCK = 2**19
MIN_QUERIES_PER_BLOCK = 64


# ---- mask losses ----------------------------------------------------------------------------------------------


def _class_chunks(batch_size: int, num_classes: int, num_pixels: int) -> list[tuple[int, int]]:
    classes_per_chunk = max(1, MASK_LOSS_ELEMENTS_PER_CHUNK // (batch_size * num_pixels))
    return [(first, min(first + classes_per_chunk, num_classes)) for first in range(0, num_classes, classes_per_chunk)]


def _sort_labelled_pixels(targets: torch.Tensor, num_classes: int, ignore_index: int, chunks: list[tuple[int, int]]):
    """The labelled pixels sorted by class, so that the pixels of each chunk of classes are one contiguous run:
    flat indices `image * P + pixel`, their classes, where each chunk's run starts, and the `(B, C)` pixel counts."""
    flat_targets = targets.reshape(-1)
    pixel_ids = torch.nonzero(flat_targets != ignore_index).squeeze(1)
    classes = flat_targets[pixel_ids]
    order = torch.argsort(classes, stable=True)
    pixel_ids, classes = pixel_ids[order], classes[order]
    chunk_starts = torch.tensor([first for first, _ in chunks] + [num_classes], device=targets.device)
    run_starts = torch.searchsorted(classes, chunk_starts)
    image_ids = pixel_ids // targets[0].numel()
    counts = torch.bincount(image_ids * num_classes + classes, minlength=targets.shape[0] * num_classes)
    return pixel_ids, classes, run_starts, counts.view(targets.shape[0], num_classes)


def _chunk_pixels(pixel_ids, classes, run_starts: list[int], chunk_index: int, first: int, num_pixels: int):
    """For the labelled pixels of one chunk of classes: their image, class relative to the chunk, and pixel."""
    run = slice(run_starts[chunk_index], run_starts[chunk_index + 1])
    chunk_pixel_ids = pixel_ids[run]
    return chunk_pixel_ids // num_pixels, classes[run] - first, chunk_pixel_ids % num_pixels


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """At least fp32, as the reference computes its losses (also under autocast)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _upsampled(logits: torch.Tensor, first: int, last: int, size: tuple[int, int]) -> torch.Tensor:
    """The logits of classes `first:last` upsampled (bilinear) to `size`, as `(B, c, P)` in the loss dtype."""
    chunk = F.interpolate(
        logits[:, first:last].to(_loss_dtype(logits)), size=size, mode="bilinear", align_corners=False
    )
    return chunk.flatten(2)


def _bilinear_matrix(input_size: int, output_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`(output_size, input_size)` weights of bilinear resizing (align_corners=False) along one axis: the 2-D resize
    is `A_h @ x @ A_w^T`, and its backward pass `A_h^T @ g @ A_w`, two matmuls instead of a scatter per pixel."""
    unit_vectors = torch.eye(input_size, dtype=dtype, device=device)[:, None, :, None]
    return F.interpolate(unit_vectors, size=(output_size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


class _UpsampledMaskLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, alpha: float, gamma: float):
        batch_size, num_classes = logits.shape[:2]
        size = tuple(targets.shape[-2:])
        positive_weight, negative_weight = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
        num_pixels = targets[0].numel()
        chunks = _class_chunks(batch_size, num_classes, num_pixels)
        pixel_ids, classes, run_starts, counts = _sort_labelled_pixels(targets, num_classes, ignore_index, chunks)
        starts = run_starts.tolist()
        focal = logits.new_zeros(batch_size, num_classes, dtype=_loss_dtype(logits))
        intersections, probability_sums = torch.zeros_like(focal), torch.zeros_like(focal)
        for chunk_index, (first, last) in enumerate(chunks):
            chunk_logits = _upsampled(logits, first, last, size)
            probabilities = chunk_logits.sigmoid()
            probability_sums[:, first:last] = probabilities.sum(-1)
            # Every pixel is first a negative of every class (BCE against 0 is softplus(x)) ...
            negative_terms = probabilities.pow(gamma).mul_(F.softplus(chunk_logits))
            focal[:, first:last] = negative_weight * negative_terms.sum(-1)
            # ... then the true class's positive term replaces its negative one at labelled pixels.
            image, relative_class, pixel = _chunk_pixels(pixel_ids, classes, starts, chunk_index, first, num_pixels)
            true_logits = chunk_logits[image, relative_class, pixel]
            true_probabilities = true_logits.sigmoid()
            positive = positive_weight * (1 - true_probabilities).pow(gamma) * F.softplus(-true_logits)
            negative = negative_weight * true_probabilities.pow(gamma) * F.softplus(true_logits)
            mask_ids = image * num_classes + relative_class + first
            focal.view(-1).index_add_(0, mask_ids, positive - negative)
            intersections.view(-1).index_add_(0, mask_ids, true_probabilities)
        focal /= num_pixels
        denominators = probability_sums + counts + 1
        dice = 1 - (2 * intersections + 1) / denominators
        present = counts > 0
        ctx.save_for_backward(logits, pixel_ids, classes, run_starts, intersections, denominators)
        ctx.settings = (size, positive_weight, negative_weight, gamma)
        ctx.mark_non_differentiable(present)
        return focal, dice, present

    @staticmethod
    def backward(ctx, grad_focal, grad_dice, _grad_present):
        logits, pixel_ids, classes, run_starts, intersections, denominators = ctx.saved_tensors
        size, positive_weight, negative_weight, gamma = ctx.settings
        batch_size, num_classes, height, width = logits.shape
        num_pixels = size[0] * size[1]
        starts = run_starts.tolist()
        grad_focal = grad_focal / num_pixels
        # d dice / d p = (2 I + 1) / D^2 at every pixel, minus 2 / D at the pixels of the class.
        dice_all_pixels = grad_dice * (2 * intersections + 1) / denominators**2
        dice_own_pixels = -2 * grad_dice / denominators
        grad_logits = torch.empty(logits.shape, dtype=_loss_dtype(logits), device=logits.device)
        rows_transposed = _bilinear_matrix(height, size[0], grad_logits.dtype, logits.device).T
        columns = _bilinear_matrix(width, size[1], grad_logits.dtype, logits.device)
        for chunk_index, (first, last) in enumerate(_class_chunks(batch_size, num_classes, num_pixels)):
            chunk_logits = _upsampled(logits, first, last, size)
            probabilities = chunk_logits.sigmoid()
            complements = 1 - probabilities
            # d/dx [p^g softplus(x)] = p^g (g (1 - p) softplus(x) + p)
            grad = F.softplus(chunk_logits).mul_(complements).mul_(gamma).add_(probabilities)
            grad.mul_(probabilities.pow(gamma)).mul_(negative_weight * grad_focal[:, first:last, None])
            grad.addcmul_(probabilities.mul_(complements), dice_all_pixels[:, first:last, None])
            image, relative_class, pixel = _chunk_pixels(pixel_ids, classes, starts, chunk_index, first, num_pixels)
            true_logits = chunk_logits[image, relative_class, pixel]
            p, q = true_logits.sigmoid(), torch.sigmoid(-true_logits)
            # d/dx [(1 - p)^g softplus(-x)] = -(1 - p)^g (g p softplus(-x) + 1 - p)
            positive = -positive_weight * q.pow(gamma) * (gamma * p * F.softplus(-true_logits) + q)
            negative = negative_weight * p.pow(gamma) * (gamma * q * F.softplus(true_logits) + p)
            mask = (image, relative_class + first)
            grad[image, relative_class, pixel] += (
                grad_focal[mask] * (positive - negative) + dice_own_pixels[mask] * p * q
            )
            grad_logits[:, first:last] = rows_transposed @ grad.view(batch_size, last - first, *size) @ columns
        return grad_logits.to(logits.dtype), None, None, None, None


def upsampled_mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, alpha: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Sigmoid focal and dice losses of every (image, class) mask, on the logits upsampled (bilinear,
    align_corners=False) to the label size, against one-hot targets that are never built: every pixel counts as a
    negative of every class, then the true class's positive term replaces its negative one at labelled pixels.
    Ignored pixels stay negatives of every class, as in the reference.

    Args:
        logits (`(B, C, h, w)`): mask logits at the patch-grid resolution.
        targets (`(B, H, W)`): class ids in `[0, C)` or `ignore_index`.
        alpha, gamma: the focal loss's weighting (`alpha < 0`: none) and focusing parameters.
    Returns:
        `(focal, dice, present)`, each `(B, C)`, in fp32 (or the logits' dtype if wider): the focal loss averaged over pixels, the dice loss
        `1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`, and whether the class has pixels in the image.
    """
    return _UpsampledMaskLosses.apply(logits, targets, ignore_index, alpha, gamma)


# ---- attention ----------------------------------------------------------------------------------------------------


# splitmix64 (Steele, Lea and Flood 2014): a Weyl sequence of 64-bit states through a mixing function. Counter-
# based, so any block's random bits follow from its stream key alone, drawn with multithreaded elementwise ops
# (PyTorch's CPU generator is sequential, and `bernoulli_` several times slower).
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_UINT64 = 2**64


def _as_int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - _UINT64 if value >= 2**63 else value


def _mix64(value: int) -> int:
    """splitmix64's mixing function on a Python integer (for the per-block stream keys)."""
    value %= _UINT64
    value = ((value ^ (value >> 30)) * _SPLITMIX_MULTIPLIERS[0]) % _UINT64
    value = ((value ^ (value >> 27)) * _SPLITMIX_MULTIPLIERS[1]) % _UINT64
    return value ^ (value >> 31)


def _logical_right_shift(words: torch.Tensor, bits: int) -> torch.Tensor:
    """`>>` of unsigned 64-bit words stored as int64 (PyTorch shifts int64 arithmetically)."""
    return (words >> bits) & ((1 << (64 - bits)) - 1)


def _random_words(stream_key: int, count: int) -> torch.Tensor:
    """`count` uniform random 64-bit words (int64, wrapping arithmetic) of the stream starting at `stream_key`."""
    words = torch.arange(count, dtype=torch.int64).mul_(_as_int64(_SPLITMIX_GAMMA)).add_(_as_int64(stream_key))
    words.bitwise_xor_(_logical_right_shift(words, 30)).mul_(_as_int64(_SPLITMIX_MULTIPLIERS[0]))
    words.bitwise_xor_(_logical_right_shift(words, 27)).mul_(_as_int64(_SPLITMIX_MULTIPLIERS[1]))
    return words.bitwise_xor_(_logical_right_shift(words, 31))


def _block_keep_mask(seed: int, block_index: int, shape: tuple[int, ...], dropout: float) -> torch.Tensor:
    """
    The keep mask of one block of attention probabilities, as floats (1: kept, 0: dropped; multiplying is much faster
    than `masked_fill_` on CPU): 16 random bits per element, dropped where they fall in the lowest `dropout` of their
    range. The drop rate is `dropout` rounded to a multiple of 2^-16 (0.1 -> 0.100006).
    """
    numel = math.prod(shape)
    # Each block's stream starts at a pseudo-random state: streams of different blocks and calls do not overlap
    # (short streams at random points of a 2^64 cycle).
    stream_key = _mix64(seed + block_index * _SPLITMIX_GAMMA)
    words = _random_words(stream_key, (numel + 3) // 4)
    bits = words.view(torch.int16)[:numel].view(shape).float()
    # Integers at or above the threshold give 1, below it 0.
    threshold = -(2**15) + round(dropout * 2**16)
    return bits.sub_(threshold - 1).clamp_(0, 1)


def _query_blocks(num_queries: int, num_keys: int) -> list[slice]:
    rows = max(MIN_QUERIES_PER_BLOCK, ATTENTION_SCORES_PER_BLOCK // num_keys)
    return [slice(start, min(start + rows, num_queries)) for start in range(0, num_queries, rows)]


def _heads(query: torch.Tensor) -> list[tuple[int, int]]:
    return [(batch, head) for batch in range(query.shape[0]) for head in range(query.shape[1])]


def _block_probabilities(scaled_query_rows, keys, mask_rows) -> torch.Tensor:
    """softmax(scaled queries @ keys^T + mask) of one head's block: `(rows, head_dim)`, `(num_keys, head_dim)` dense
    rows (the product's fast layout) and `(rows, num_keys)` or `None`."""
    scores = linear(scaled_query_rows, keys)
    if mask_rows is not None:
        scores += mask_rows
    return scores.softmax(dim=-1)


class _BlockedAttention(torch.autograd.Function):
    # Per head and block of queries: the block's scores stay in the processor's cache, and the products read dense
    # rows, the layout oneDNN's kernel needs (`linear`), except the keys' and values' gradients, which reduce over
    # the block's queries (`torch.mm` of the transposed block). The dropout's 1 / (1 - p) scale is applied to the small
    # operands (values, output gradients), the softmax scale to the queries (and to the keys for the queries'
    # gradient). The backward pass runs under the forward pass's autocast state (CPU only: the function serves CPU
    # attention).

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, query, key, value, additive_mask, dropout: float, scale: float, seed: int):
        batch_size, num_heads, num_queries, _ = query.shape
        blocks = _query_blocks(num_queries, key.shape[-2])
        # Stored as (batch, queries, heads, head_dim), the layout the output projection reads.
        output = query.new_empty(batch_size, num_queries, num_heads, value.shape[-1]).transpose(1, 2)
        masks = None if additive_mask is None else additive_mask.expand(*query.shape[:-1], key.shape[-2])
        for head_index, (batch, head) in enumerate(_heads(query)):
            scaled_query = (query[batch, head] * scale).contiguous()
            keys = key[batch, head].contiguous()
            value_columns = (value[batch, head] / (1 - dropout)).t().contiguous()
            for block_index, block in enumerate(blocks):
                probabilities = _block_probabilities(
                    scaled_query[block], keys, None if masks is None else masks[batch, head, block]
                )
                if dropout:
                    keep_index = head_index * len(blocks) + block_index
                    probabilities.mul_(_block_keep_mask(seed, keep_index, probabilities.shape, dropout))
                output[batch, head, block] = linear(probabilities, value_columns)
        ctx.save_for_backward(query, key, value, output, additive_mask)
        ctx.settings = (dropout, scale, seed)
        return output

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output):
        query, key, value, output, additive_mask = ctx.saved_tensors
        dropout, scale, seed = ctx.settings
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        # sum_j dP_j P_j of the softmax backward equals dO . O (O = dropped P @ V): one value per query.
        output_dots = (grad_output * output).sum(-1, keepdim=True)
        masks = None if additive_mask is None else additive_mask.expand(*query.shape[:-1], key.shape[-2])
        for head_index, (batch, head) in enumerate(_heads(query)):
            head_masks = None if masks is None else masks[batch, head]
            grad_query[batch, head], grad_key[batch, head], grad_value[batch, head] = _head_attention_backward(
                query[batch, head], key[batch, head], value[batch, head], grad_output[batch, head],
                output_dots[batch, head], head_masks, dropout, scale, seed, head_index,
            )  # fmt: skip
        return grad_query, grad_key, grad_value, None, None, None, None


def _head_attention_backward(
    query, key, value, grad_output, output_dots, masks, dropout: float, scale: float, seed: int, head_index: int
):
    """One head's gradients `(query, key, value)` of [`_BlockedAttention`] (`(length, head_dim)` each), a block of
    queries at a time, its probabilities recomputed and its dropout masks (those of head `head_index`) replayed."""
    blocks = _query_blocks(query.shape[0], key.shape[0])
    scaled_query, keys, values = (query * scale).contiguous(), key.contiguous(), value.contiguous()
    scaled_key_columns = (key * scale).t().contiguous()
    scaled_grad_output = (grad_output / (1 - dropout)).contiguous()
    grad_query = torch.empty_like(query)
    grad_key, grad_value = torch.zeros_like(keys), torch.zeros_like(values)
    for block_index, block in enumerate(blocks):
        probabilities = _block_probabilities(scaled_query[block], keys, None if masks is None else masks[block])
        grad_probabilities = linear(scaled_grad_output[block], values)
        kept = probabilities
        if dropout:
            keep = _block_keep_mask(seed, head_index * len(blocks) + block_index, probabilities.shape, dropout)
            kept = probabilities * keep
            grad_probabilities.mul_(keep)
        grad_value += torch.mm(kept.t(), scaled_grad_output[block])
        grad_scores = probabilities.mul_(grad_probabilities.sub_(output_dots[block]))
        grad_query[block] = linear(grad_scores, scaled_key_columns)
        grad_key += torch.mm(grad_scores.t(), scaled_query[block])
    return grad_query, grad_key, grad_value


def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    additive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `dropout(softmax(query @ key^T * scale + additive_mask)) @ value` for `(batch, heads, length, head_dim)` CPU
    tensors, per head and block of queries, with autograd: the probabilities are recomputed in the backward pass (as
    flash attention does), the dropout masks (see `_block_keep_mask`) replayed from a seed drawn from the default
    generator. The products go through [`~onednn.linear`] (oneDNN's kernel where it is faster, `F.linear` elsewhere).
    `additive_mask` broadcasts to `(batch, heads, query_length, key_length)` and gets no gradient. Returns
    `(batch, heads, query_length, head_dim)`, a view of a `(batch, query_length, heads, head_dim)` tensor.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    seed = int(torch.randint(0, 2**62, ())) if dropout else 0
    return _BlockedAttention.apply(query, key, value, additive_mask, dropout, scale, seed)


# ---- dropout ------------------------------------------------------------------------------------------------------


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, dropout: float, seed: int):
        ctx.settings = (dropout, seed)
        return inputs * _block_keep_mask(seed, 0, inputs.shape, dropout).mul_(1 / (1 - dropout)).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        dropout, seed = ctx.settings
        keep = _block_keep_mask(seed, 0, grad_output.shape, dropout).mul_(1 / (1 - dropout)).to(grad_output.dtype)
        return grad_output * keep, None, None


def fast_dropout(inputs: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """
    `F.dropout` for CPU training with the attention's counter-based masks (see `_block_keep_mask`): several times
    faster than `bernoulli_`, and the mask is redrawn in the backward pass instead of kept. `F.dropout` elsewhere.
    """
    if not training or dropout == 0 or inputs.device.type != "cpu" or not torch.is_grad_enabled():
        return F.dropout(inputs, dropout, training)
    return _Dropout.apply(inputs, dropout, int(torch.randint(0, 2**62, ())))
