"""
Memory-lean autograd functions of the CLIP-RC training step, each equal (up to float rounding) to the plain
computation it replaces, with a hand-written backward pass that recomputes its large intermediates chunk by chunk:

- [`upsampled_mask_losses`]: the sigmoid focal and dice losses of every (image, class) mask on the logits upsampled
  to the label size. The plain computation keeps several full-resolution tensors per class for the backward pass
  (156 classes x 512 x 512 floats each at COCO-Stuff size); here a few classes at a time are upsampled, scored and
  dropped, forward and backward, so the full-resolution work stays in the processor's caches.
- [`attention_with_dropout`]: softmax attention with dropout on the attention probabilities, as the reference's
  decoder trains. CPU attention kernels do dropout only by materialising the (heads, queries, keys) maps; here they
  are computed a block of queries at a time and recomputed in the backward pass (as flash attention does), the
  dropout masks drawn from a counter-based generator so that the backward pass replays them.
- [`fast_dropout`]: dropout with the same fast, replayable masks (the decoder's activations).
"""

import math

import torch
import torch.nn.functional as F


__all__ = ["attention_with_dropout", "fast_dropout", "upsampled_mask_losses"]

# Full-resolution elements (per intermediate tensor) of one chunk of classes of the mask losses: 1 MB in fp32, a
# class of a 512 x 512 label map per chunk.
MASK_LOSS_ELEMENTS_PER_CHUNK = 2**18
# Attention-probability elements of one block of queries (8 MB in fp32: ~100 or more queries per block at the
# decoder's sizes, enough for the matrix products to run near their peak).
ATTENTION_ELEMENTS_PER_BLOCK = 2**21


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


# ---- attention with dropout ---------------------------------------------------------------------------------------


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


def _query_blocks(query: torch.Tensor, num_keys: int) -> list[tuple[int, int]]:
    batch_heads, num_queries = query.shape[0] * query.shape[1], query.shape[2]
    rows = max(1, ATTENTION_ELEMENTS_PER_BLOCK // (batch_heads * num_keys))
    return [(start, min(start + rows, num_queries)) for start in range(0, num_queries, rows)]


def _block_probabilities(scaled_query_block: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return torch.matmul(scaled_query_block, key.transpose(-1, -2)).softmax(dim=-1)


class _AttentionWithDropout(torch.autograd.Function):
    # The dropout's 1 / (1 - p) scale is applied to the small operands (values, output gradients), not to the
    # (queries x keys) blocks; the softmax scale to the queries. The backward pass runs under the forward pass's
    # autocast state (CPU only: the function serves CPU attention).

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, query, key, value, dropout: float, scale: float, seed: int):
        scaled_query = query * scale
        scaled_value = value / (1 - dropout)
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        for block_index, (start, end) in enumerate(_query_blocks(query, key.shape[-2])):
            probabilities = _block_probabilities(scaled_query[:, :, start:end], key)
            kept = probabilities.mul_(_block_keep_mask(seed, block_index, probabilities.shape, dropout))
            output[:, :, start:end] = torch.matmul(kept, scaled_value)
        ctx.save_for_backward(query, key, value, output)
        ctx.settings = (dropout, scale, seed)
        return output

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output):
        query, key, value, output = ctx.saved_tensors
        dropout, scale, seed = ctx.settings
        scaled_query = query * scale
        scaled_grad_output = grad_output / (1 - dropout)
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        # sum_j dP_j P_j of the softmax backward equals dO . O (O = dropped P @ V): one value per query.
        output_dots = (grad_output * output).sum(-1, keepdim=True)
        for block_index, (start, end) in enumerate(_query_blocks(query, key.shape[-2])):
            probabilities = _block_probabilities(scaled_query[:, :, start:end], key)
            keep = _block_keep_mask(seed, block_index, probabilities.shape, dropout)
            grad_output_block = scaled_grad_output[:, :, start:end]
            grad_value += torch.matmul((probabilities * keep).transpose(-1, -2), grad_output_block)
            grad_probabilities = torch.matmul(grad_output_block, value.transpose(-1, -2)).mul_(keep)
            grad_scores = probabilities.mul_(grad_probabilities.sub_(output_dots[:, :, start:end]))
            grad_query[:, :, start:end] = torch.matmul(grad_scores, key).mul_(scale)
            grad_key += torch.matmul(grad_scores.transpose(-1, -2), scaled_query[:, :, start:end])
        return grad_query, grad_key, grad_value, None, None, None


def attention_with_dropout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scale: float
) -> torch.Tensor:
    """
    `dropout(softmax(query @ key^T * scale)) @ value` for `(B, heads, L, head_dim)` CPU tensors, a block of queries at
    a time, the probabilities recomputed in the backward pass (the dropout masks, see `_block_keep_mask`, replayed
    from a seed drawn from the default generator). Returns
    `(B, heads, L_query, head_dim)`.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    seed = int(torch.randint(0, 2**62, ()))
    return _AttentionWithDropout.apply(query, key, value, dropout, scale, seed)


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
