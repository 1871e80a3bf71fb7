"""
fp32 linear layers on CPU through oneDNN.

PyTorch runs an fp32 `F.linear` on CPU through MKL's sgemm. On some processors, such as AMD's Zen 5, MKL picks a
kernel that runs at about half of what the processor can do, while oneDNN (also part of PyTorch's CPU build) runs
AVX-512 at full width: ~500 against ~230 GFLOP/s on two Zen 5 cores, for every shape CLIP-RC multiplies. [`linear`]
takes oneDNN's kernel where it is measurably faster (timed once per process and thread count) and `F.linear`
everywhere else: other devices and dtypes, autocast, and traced or compiled graphs (which must stay portable).
[`~fused_ops.blocked_attention`] builds attention from the same products (CPU SDPA's are MKL's). It computes in
fp32: results differ from the default kernel's by float rounding only (a few 1e-6 relative).
`torch.backends.mkldnn.flags(enabled=False)` turns it off.
"""

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes
from transformers.utils import logging


__all__ = ["applies", "interleaved_best_seconds", "linear", "onednn_linear_speedup", "timed_speedup"]

logger = logging.get_logger(__name__)

# oneDNN must be this much faster than `F.linear` on a CLIP-sized product to be used.
MIN_ONEDNN_SPEEDUP = 1.15


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


def _seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_best_seconds(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best seconds of each function: one warm-up call of each (kernel selection, buffers, compilation), then
    `repeats` calls each, in turns so that a busy machine slows all alike."""
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            best[name] = min(best[name], _seconds(function))
    return best


def timed_speedup(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int) -> float:
    """`baseline` time / `candidate` time, each the best of `repeats` interleaved calls after a warm-up."""
    best = interleaved_best_seconds({"baseline": baseline, "candidate": candidate}, repeats)
    return best["baseline"] / best["candidate"]


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
    """`rows @ weight.T + bias` for 2-D `rows` through oneDNN, forward and gradients. The input gradient takes the
    weight transposed, and the weight gradient, a reduction over the rows, both operands transposed: as views, which
    oneDNN reorders itself, faster than transposed copies (the same gradients, bitwise on an AMD Zen 5; the training
    step ~3 % faster) and 1.2-1.8x MKL's product with transposed operands at the decoder's shapes."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        return _onednn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad_outputs):
        rows, weight = ctx.saved_tensors
        # Dense operands and views of them only: other strides would take oneDNN's slow path.
        grad_outputs = grad_outputs.contiguous()
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = _onednn_linear(grad_outputs, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_linear(grad_outputs.t(), rows.t(), None)
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
