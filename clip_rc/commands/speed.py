"""Speed and memory of CLIP-RC on this machine: inference and training steps, fp32 and bf16, several class counts.

Each case runs in a fresh subprocess so that its peak memory (process RSS on CPU, `max_memory_allocated` on CUDA)
is its own. FLOPs per crop are counted with `torch.utils.flop_counter.FlopCounterMode`; the achieved rate is set
against a matmul peak measured in the same run.

    python -m clip_rc.commands.speed --threads 2 --json results.json
"""

import argparse
import logging
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
from ..utils import setup_logging, write_json_atomic
from ..presets import preset_config


logger = logging.getLogger("clip_rc.commands.speed")

# (name, preset, number of classes, training?) as in the table: VOC 20, COCO-Stuff 171, an open vocabulary.
DEFAULT_CASES = (
    ("inference-20", "voc-inductive", 20, False),
    ("inference-171", "coco-stuff-inductive", 171, False),
    ("inference-1000", "coco-stuff-inductive", 1000, False),
    ("train-20", "voc-inductive", 20, True),
    ("train-171", "coco-stuff-inductive", 171, True),
)


@dataclass
class CaseResult:
    name: str
    preset: str
    num_classes: int
    training: bool
    dtype: str
    batch_size: int
    compiled: bool
    seconds_per_crop: float
    crops_per_second: float
    peak_memory_mb: float
    gflop_per_crop: float
    achieved_gflops: float
    gradient_checkpointing: bool = False


def build_model(preset: str, num_classes: int, tiny: bool) -> CLIPRCForSemanticSegmentation:
    """The preset's model with random weights and `num_classes` random class embeddings."""
    overrides = {"id2label": {index: f"class {index}" for index in range(num_classes)}}
    if tiny:
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        overrides.update(
            vision_config={**tower, "patch_size": 8, "image_size": 32},
            text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
            projection_dim=24, crop_size=64, sliding_window_stride=48, num_prompt_tokens=3, region_grid_size=2,
            decoder_hidden_size=24, decoder_num_attention_heads=4, decoder_intermediate_size=48,
        )
    config = preset_config(preset, **overrides)
    if config.setting == "inductive":
        unseen = set(config.unseen_class_ids)
        # Keep the preset's proportion of seen classes for class counts other than the benchmark's.
        fraction = len(unseen) / len(preset_config(preset).id2label)
        num_unseen = max(1, round(fraction * num_classes))
        config.seen_class_ids = list(range(num_classes - num_unseen))
    model = CLIPRCForSemanticSegmentation(config)
    model.set_class_embeddings(torch.randn(num_classes, config.projection_dim))
    return model


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    name, preset, num_classes, training, dtype, batch_size, runs, warmup, threads, tiny, device, compiled=False,
    gradient_checkpointing=False,
) -> CaseResult:
    """Time one case in this process (meant to run in a fresh subprocess)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    model = build_model(preset, num_classes, tiny).to(device)
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    crop = model.config.crop_size
    pixel_values = torch.randn(batch_size, 3, crop, crop, device=device)
    labels = torch.randint(0, num_classes, (batch_size, crop, crop), device=device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if training else None
    model.train(training)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    if compiled:
        # In place, so that the label-map path below runs the compiled image tower and head.
        model.clip_rc.vision_model.compile()
        model.decode_head.compile()

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if training:
                loss = model(pixel_values, labels=labels).loss
            else:
                # What inference delivers: the crop's label map (calibrated sigmoid scores, arg-max over classes).
                image_processor.post_process_semantic_segmentation(model(pixel_values=pixel_values))
        if training:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    if compiled:
        step()  # compilation happens here, outside the timings
    for _ in range(warmup):
        step()
    timings = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings) / batch_size
    # Read before counting FLOPs: a step under the counter's dispatch mode takes far more memory than the timed
    # steps (train-171 with checkpointing: 4.8 GB against 2.1 GB), and the peak is the process's high-water mark.
    peak_memory_mb = _peak_memory_mb(device)
    flop_counter = FlopCounterMode(display=False)
    with flop_counter:
        step()
    gflop_per_crop = flop_counter.get_total_flops() / batch_size / 1e9
    return CaseResult(
        name, preset, num_classes, training, dtype, batch_size, compiled, seconds, 1 / seconds, peak_memory_mb,
        gflop_per_crop, gflop_per_crop / seconds, gradient_checkpointing,
    )


def matmul_peak_gflops(dtype: torch.dtype, threads: int, device: str, size: int = 512, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of a square matmul with `threads` threads (the caller's thread count is kept)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        left = torch.randn(size, size, device=device, dtype=dtype)
        right = torch.randn(size, size, device=device, dtype=dtype)
        left @ right
        best = float("inf")
        for _ in range(repeats):
            _synchronize(torch.device(device))
            start = time.perf_counter()
            left @ right
            _synchronize(torch.device(device))
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return 2 * size**3 / best / 1e9


def _case_worker(queue, kwargs):
    try:
        queue.put(asdict(run_case(**kwargs)))
    except Exception as error:  # reported to the parent, which names the case
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_in_subprocess(**kwargs) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_case_worker, args=(queue, kwargs))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"benchmark case {kwargs['name']} ({kwargs['dtype']}, batch {kwargs['batch_size']}): {result['error']}")
    return result


def _mode(result: dict) -> str:
    mode = "compiled" if result["compiled"] else "eager"
    return mode + "+ckpt" if result.get("gradient_checkpointing") else mode


def format_table(results: list[dict], peaks: dict[str, float]) -> str:
    header = f"{'case':<16}{'mode':<11}{'dtype':<6}{'batch':>6}{'s/crop':>9}{'crops/s':>9}{'peak MB':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'% peak':>8}"
    lines = [header, "-" * len(header)]
    for result in results:
        peak = peaks.get(result["dtype"], peaks["fp32"])
        lines.append(
            f"{result['name']:<16}{_mode(result):<11}{result['dtype']:<6}{result['batch_size']:>6}{result['seconds_per_crop']:>9.3f}"
            f"{result['crops_per_second']:>9.2f}{result['peak_memory_mb']:>9.0f}{result['gflop_per_crop']:>9.1f}"
            f"{result['achieved_gflops']:>9.1f}{100 * result['achieved_gflops'] / peak:>7.0f}%"
        )
    lines.append("matmul peak (GFLOP/s): " + ", ".join(f"{key} {value:.0f}" for key, value in peaks.items()))
    return "\n".join(lines)


def run_benchmark(argv: list[str] | None = None) -> dict:
    """Time the cases of the command line `argv` (see `--help`); prints the table and returns the report (also
    written to `--json`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=[case[0] for case in DEFAULT_CASES],
                        help="any of " + ", ".join(case[0] for case in DEFAULT_CASES))
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch_sizes", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (seconds; for tests)")
    parser.add_argument("--compile", action="store_true", help="also time inference through torch.compile")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="also time training steps that recompute the image tower's and the decoder's layers in the backward pass",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    setup_logging()

    known = {case[0]: case for case in DEFAULT_CASES}
    unknown = [name for name in args.cases if name not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(known)}")
    peaks = {
        dtype: matmul_peak_gflops({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
                                  args.threads, args.device)
        for dtype in sorted(set(args.dtypes) | {"fp32"})
    }
    results = []
    for name in args.cases:
        _, preset, num_classes, training = known[name]
        for dtype in args.dtypes:
            for batch_size in args.batch_sizes:
                variants = [(False, False)]
                if args.compile and not training:
                    variants.append((True, False))
                if args.gradient_checkpointing and training:
                    variants.append((False, True))
                for compiled, checkpointing in variants:
                    logger.info("running %s %s batch %d%s%s", name, dtype, batch_size, " compiled" if compiled else "",
                                " with gradient checkpointing" if checkpointing else "")
                    results.append(run_in_subprocess(
                        name=name, preset=preset, num_classes=num_classes, training=training, dtype=dtype,
                        batch_size=batch_size, runs=args.runs, warmup=args.warmup, threads=args.threads,
                        tiny=args.tiny, device=args.device, compiled=compiled, gradient_checkpointing=checkpointing,
                    ))
    report = {
        "machine": {"threads": args.threads, "device": args.device, "torch": torch.__version__},
        "matmul_peak_gflops": peaks,
        "results": results,
    }
    sys.stdout.write(format_table(results, peaks) + "\n")
    if args.json:
        write_json_atomic(args.json, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """`clip-rc-benchmark`: see [`run_benchmark`]; returns the exit status, 0 on success (errors raise)."""
    run_benchmark(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
