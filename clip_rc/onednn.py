"""
fp32 linear layers and inference attention on CPU through oneDNN.

PyTorch runs an fp32 `F.linear` on CPU through MKL's sgemm. On some processors, such as AMD's Zen 5, MKL picks a
kernel that runs at about half of what the processor can do, while oneDNN (also part of PyTorch's CPU build) runs
AVX-512 at full width: ~500 against ~230 GFLOP/s on two Zen 5 cores, for every shape CLIP-RC multiplies. [`linear`]
takes oneDNN's kernel where it is measurably faster (timed once per process and thread count) and `F.linear`
everywhere else: other devices and dtypes, autocast, and traced or compiled graphs (which must stay portable).
[`attention`] builds inference attention from the same products (CPU SDPA's are MKL's). Both compute in fp32:
results differ from the default kernels' by float rounding only (a few 1e-6 relative).
`torch.backends.mkldnn.flags(enabled=False)` turns them off.
"""

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes
from transformers.utils import logging


__all__ = ["applies", "attention", "linear", "onednn_linear_speedup", "timed_speedup"]

logger = logging.get_logger(__name__)

# Attention scores per block of queries: 2 MB in fp32 (at least 64 queries, for the products' efficiency).
ATTENTION_SCORES_PER_BLOCK = 2**19
MIN_QUERIES_PER_BLOCK = 64
# oneDNN must be this much faster than `F.linear` on a CLIP-sized product to be used.
MIN_ONEDNN_SPEEDUP = 1.15


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


def _seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def timed_speedup(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int) -> float:
    """`baseline` time / `candidate` time: one warm-up call of each (kernel selection, buffers), then the best of
    `repeats` calls each, interleaved so that a busy machine slows both alike."""
    baseline(), candidate()
    baseline_best = candidate_best = float("inf")
    for _ in range(repeats):
        baseline_best = min(baseline_best, _seconds(baseline))
        candidate_best = min(candidate_best, _seconds(candidate))
    return baseline_best / candidate_best


@functools.cache
def onednn_linear_speedup(num_threads: int, repeats: int = 5) -> float:
    """`F.linear` time / oneDNN time of a (1024 x 768) x (768 x 768) fp32 product with `num_threads` threads (the
    current count; best of `repeats`, interleaved so that a busy machine slows both alike). Measured once per count."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return 0.0
    # Out of any active dispatch mode (a FLOP counter, fake tensors): the timing is not part of the caller's work.
    with _disable_current_modes():
        try:
            speedup = _time_kernels(repeats)
        except (RuntimeError, TypeError) as error:  # the op is internal to PyTorch: its signature may change
            logger.warning(f"oneDNN's linear kernel did not run ({error}); linear layers use F.linear.")
            return 0.0
    kernel = "oneDNN" if speedup >= MIN_ONEDNN_SPEEDUP else "F.linear"
    logger.info(
        f"fp32 linear layers on CPU with {num_threads} threads: {kernel} (oneDNN at {speedup:.2f}x F.linear's speed)."
    )
    return speedup


def _time_kernels(repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1024, 768, generator=generator)
    weight = torch.randn(768, 768, generator=generator)
    return timed_speedup(lambda: F.linear(inputs, weight), lambda: _onednn_linear(inputs, weight, None), repeats)


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether oneDNN's kernels serve these fp32 CPU tensors (`None` entries ignored): eager mode, no autocast, and
    oneDNN enabled and faster than the default kernel on this processor."""
    tensors = [tensor for tensor in tensors if tensor is not None]
    return (
        all(tensor.device.type == "cpu" and tensor.dtype == torch.float32 for tensor in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and torch._C._get_mkldnn_enabled()
        and onednn_linear_speedup(torch.get_num_threads()) >= MIN_ONEDNN_SPEEDUP
    )


class _OneDNNLinear(torch.autograd.Function):
    """`rows @ weight.T + bias` for 2-D `rows` through oneDNN, forward and input gradient (the product with the
    transposed weight); the weight gradient, a reduction over every row, goes through `torch.mm`."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        return _onednn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad_outputs):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = _onednn_linear(grad_outputs, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_outputs.t() @ rows
        if ctx.needs_input_grad[2]:
            grad_bias = grad_outputs.sum(0)
        return grad_rows, grad_weight, grad_bias


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(inputs, weight, bias)`, through oneDNN where that is faster (see the module docstring)."""
    # oneDNN's fast kernels read dense rows; strided views (such as a weight's column slice) take a slow path.
    if not (inputs.is_contiguous() and weight.is_contiguous() and applies(inputs, weight, bias)):
        return F.linear(inputs, weight, bias)
    # The kernel's own outputs, not views of them: autograd lets callers (in-place activations) modify those.
    rows = inputs.reshape(-1, inputs.shape[-1])
    tensors = (inputs, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)
    outputs = _OneDNNLinear.apply(rows, weight, bias) if needs_grad else _onednn_linear(rows, weight, bias)
    return outputs.view(*inputs.shape[:-1], weight.shape[0])


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    additive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `softmax(query @ key^T * scale + additive_mask) @ value` for `(batch, heads, length, head_dim)` tensors that
    [`applies`] serves, without autograd, through oneDNN's products: per head and block of queries, the scores, their
    softmax and the weighted values, the scores of a block staying in the processor's cache. `additive_mask`
    broadcasts to `(batch, heads, query_length, key_length)`. Returns `(batch, query_length, heads, head_dim)`, the
    layout of transformers' attention functions. CPU SDPA runs its products through MKL's kernels.
    """
    batch_size, num_heads, num_queries, head_dim = query.shape
    # Dense rows per head: the queries pre-scaled, the keys, the values transposed (the second product's weight).
    scaled_query = (query * scale).contiguous()
    key = key.contiguous()
    value_columns = value.transpose(-1, -2).contiguous()
    output = query.new_empty(batch_size, num_queries, num_heads, head_dim)
    if additive_mask is not None:
        additive_mask = additive_mask.expand(batch_size, num_heads, num_queries, key.shape[-2])
    block_size = max(MIN_QUERIES_PER_BLOCK, ATTENTION_SCORES_PER_BLOCK // key.shape[-2])
    for batch_index in range(batch_size):
        for head in range(num_heads):
            head_keys, head_value_columns = key[batch_index, head], value_columns[batch_index, head]
            for start in range(0, num_queries, block_size):
                block = slice(start, start + block_size)
                scores = _onednn_linear(scaled_query[batch_index, head, block], head_keys, None)
                if additive_mask is not None:
                    scores += additive_mask[batch_index, head, block]
                output[batch_index, block, head] = _onednn_linear(scores.softmax(dim=-1), head_value_columns, None)
    return output
