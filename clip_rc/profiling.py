"""
Measuring CLIP-RC's cost: FLOPs of a call, the processor's matmul peak, peak memory, and random full-size models.

Shared by `clip-rc-flops` (parameters and FLOPs per part), `clip-rc-benchmark` (speed as a fraction of the matmul
peak) and the scripts of `benchmarks/`. FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts a
multiply-add as 2 FLOPs and counts matrix products, convolutions and attention kernels only (no norms, activations
or softmax); the CPU attention kernels, which it has no formula for, are counted like the CUDA ones.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .configuration_clip_rc import CLIPRCConfig
from .modeling_clip_rc import CLIPRCForSemanticSegmentation
from .onednn import linear


__all__ = [
    "OPEN_VOCABULARY_IGNORE_INDEX",
    "count_flops",
    "matmul_peak_gflops",
    "peak_memory_mb",
    "random_preset_model",
    "synchronize",
]


def _onednn_linear_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(input_shape) * weight_shape[0]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# On `meta` attention decomposes into counted matrix products and linear layers run `F.linear`; on CPU they run these
# kernels (fused attention, oneDNN's linear: see `clip_rc.onednn`), whose formulas make CPU and meta counts agree.
_CPU_KERNEL_FORMULAS = {
    getattr(namespace, name): formula
    for namespace, name, formula in (
        (torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
        (torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops),
        (torch.ops.mkldnn, "_linear_pointwise", _onednn_linear_flops),
    )
    if hasattr(namespace, name)
}


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call of `function` (matrix products, convolutions and attention kernels, forward and backward
    if it runs a backward pass), on any device including `meta`."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_KERNEL_FORMULAS)
    with counter:
        function()
    return int(counter.get_total_flops())


def synchronize(device: torch.device | str):
    """Wait for the device's queued work (CUDA runs asynchronously), so that timings cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """The high-water mark of this process: `max_memory_allocated` on CUDA, the peak RSS on CPU (in MiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_peak_gflops(
    dtype: torch.dtype, threads: int, device: str, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3
) -> float:
    """The best GFLOP/s of square matrix products of `sizes` (best of `repeats` each) with `threads` threads (the
    caller's thread count is kept), through `torch.mm` and through the model's linear layers' kernel
    ([`~onednn.linear`]: oneDNN where it is faster): the processor's practical peak, which small matrices do not
    reach with several threads."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    best_rate = 0.0
    try:
        for size in sizes:
            left = torch.randn(size, size, device=device, dtype=dtype)
            right = torch.randn(size, size, device=device, dtype=dtype)
            for product in (torch.mm, linear):
                product(left, right)
                for _ in range(repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    product(left, right)
                    synchronize(device)
                    best_rate = max(best_rate, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(previous_threads)
    return best_rate


# Ignored label of models with more classes than the presets' 255 (the largest value of a 16-bit label map).
OPEN_VOCABULARY_IGNORE_INDEX = 65535

_TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_TINY_OVERRIDES = {
    "vision_config": {**_TINY_TOWER, "patch_size": 8, "image_size": 32},
    "text_config": {**_TINY_TOWER, "vocab_size": 64, "max_position_embeddings": 16},
    "projection_dim": 24, "crop_size": 64, "sliding_window_stride": 48, "num_prompt_tokens": 3, "region_grid_size": 2,
    "decoder_hidden_size": 24, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 48,
}  # fmt: skip


def random_preset_model(
    preset: str, num_classes: int | None = None, tiny: bool = False
) -> CLIPRCForSemanticSegmentation:
    """
    The preset's model with random weights and `num_classes` random class embeddings (default: the preset's
    classes); nothing is downloaded. For another class count a zero-shot preset keeps its proportion of unseen
    classes, as the last ids. `tiny` swaps in towers and a head of a few thousand parameters (for tests).
    """
    preset_classes = CLIPRCConfig.from_preset(preset)
    overrides = dict(_TINY_OVERRIDES) if tiny else {}
    if num_classes is not None and num_classes != preset_classes.num_labels:
        overrides["id2label"] = {index: f"class {index}" for index in range(num_classes)}
        if num_classes > preset_classes.ignore_index:
            overrides["ignore_index"] = OPEN_VOCABULARY_IGNORE_INDEX
        if preset_classes.unseen_class_ids:
            fraction = len(preset_classes.unseen_class_ids) / preset_classes.num_labels
            overrides["seen_class_ids"] = list(range(num_classes - max(1, round(fraction * num_classes))))
    config = CLIPRCConfig.from_preset(preset, **overrides)
    model = CLIPRCForSemanticSegmentation(config)
    model.set_class_embeddings(torch.randn(config.num_labels, config.projection_dim))
    return model
