"""
Numeric precision of the commands (`--dtype` of the benchmark, evaluation, prediction and training) and a short
description of the processor they run on.

`--dtype auto` picks bf16 autocast only where bf16 matrix products are fast: on CUDA devices with native bf16, and on
CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX on x86) whose bf16 matmul, timed once per process, beats
the fp32 one by `MIN_BF16_SPEEDUP`. Everywhere else it is fp32: PyTorch emulates bf16 products on other CPUs, several
times slower than fp32.
"""

import contextlib
import functools
import logging
import os
import platform

import torch

from .onednn import linear, timed_speedup


logger = logging.getLogger("clip_rc.precision")

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A bf16 matmul must be this much faster than the fp32 one to be worth autocast's casts.
MIN_BF16_SPEEDUP = 1.3
# x86 flags of processors that multiply bf16 natively (/proc/cpuinfo spelling).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")

__all__ = [
    "DTYPE_CHOICES",
    "accelerator_device_type",
    "autocast",
    "bf16_matmul_speedup",
    "cpu_description",
    "fast_bf16_matmul",
    "format_cpu_description",
    "mixed_precision_of",
    "resolve_dtype",
]


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_description() -> dict:
    """Processor model, logical CPUs and which of the flags that matter for matmul speed it has (`None` where the
    flags cannot be read), PyTorch's CPU capability and version."""
    info = _cpuinfo()
    flags = set(info["flags"].split()) if "flags" in info else None
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "flags": None if flags is None else {flag: flag in flags for flag in REPORTED_CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def format_cpu_description(description: dict) -> str:
    """One line of [`cpu_description`]: model, logical CPUs, the matmul flags, torch version."""
    flags = description["flags"]
    flag_text = (
        "flags unknown"
        if flags is None
        else ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in flags.items())
    )
    return (
        f"{description['cpu']}, {description['logical_cpus']} logical CPUs ({flag_text}); torch {description['torch']}, "
        f"CPU capability {description['torch_cpu_capability']}"
    )


@functools.cache
def bf16_matmul_speedup(size: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a `size`-square CPU matmul with the current thread count, through the model's
    linear layers' kernel ([`~onednn.linear`]; best of `repeats`, the two interleaved so that a busy machine slows both
    alike). Measured once per process."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator)
    right = torch.randn(size, size, generator=generator)
    left_bf16, right_bf16 = left.bfloat16(), right.bfloat16()
    return timed_speedup(lambda: linear(left, right), lambda: linear(left_bf16, right_bf16), repeats)


def fast_bf16_matmul(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run fast on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    flags = cpu_description()["flags"]
    if flags is not None and platform.machine() in ("x86_64", "AMD64") and not any(flags[f] for f in BF16_CPU_FLAGS):
        return False
    return bf16_matmul_speedup() >= MIN_BF16_SPEEDUP


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """`"fp32"`, `"bf16"` or `"fp16"` for a `--dtype` value; `"auto"` is resolved for `device` (and logged)."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}.")
    if name != "auto":
        return name
    resolved = "bf16" if fast_bf16_matmul(device) else "fp32"
    logger.info(f"--dtype auto: {resolved} on {torch.device(device).type} ({_auto_reason(device, resolved)}).")
    return resolved


def _auto_reason(device, resolved: str) -> str:
    if torch.device(device).type != "cpu":
        return "native bf16" if resolved == "bf16" else "no native bf16"
    flags = cpu_description()["flags"]
    if flags is not None and platform.machine() in ("x86_64", "AMD64") and not any(flags[f] for f in BF16_CPU_FLAGS):
        return "the CPU has neither AVX512-BF16 nor AMX"
    return f"bf16 matmul {bf16_matmul_speedup():.1f}x the fp32 speed, threshold {MIN_BF16_SPEEDUP}x"


def autocast(dtype: str, device: str | torch.device = "cpu"):
    """The autocast context of a resolved dtype (`"fp32"`: no autocast)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])


def accelerator_device_type(cpu: bool = False) -> str:
    """The device type Accelerate will run on: the current accelerator unless `cpu`, else the CPU."""
    if cpu or not torch.accelerator.is_available():
        return "cpu"
    return torch.accelerator.current_accelerator().type


def mixed_precision_of(dtype: str) -> str:
    """Accelerate's `mixed_precision` value of a resolved dtype."""
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[dtype]
