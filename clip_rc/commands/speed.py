"""Speed and memory of CLIP-RC on this machine: inference and training steps, fp32 and bf16, several class counts.

Each case runs in a fresh subprocess so that its peak memory (process RSS on CPU, `max_memory_allocated` on CUDA)
is its own. FLOPs per crop are counted with `torch.utils.flop_counter.FlopCounterMode` (with CPU attention kernels'
FLOPs added, which it does not count); the achieved rate is set against the matmul peak of the same dtype measured
in the same run (the best of square matmuls of a few sizes), giving each case's fraction of the peak. `--dtypes auto`
resolves to bf16 where the processor multiplies bf16 fast, fp32 elsewhere (see `clip_rc.precision`).

    python -m clip_rc.commands.speed --threads 2 --dtypes fp32 auto --json results.json
"""

import argparse
import logging
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..precision import AUTOCAST_DTYPES, cpu_description, format_cpu_description, resolve_dtype
from ..profiling import count_flops, matmul_peak_gflops, peak_memory_mb, random_preset_model, synchronize
from ..utils import setup_logging, write_json_atomic


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


def run_case(
    name,
    preset,
    num_classes,
    training,
    dtype,
    batch_size,
    runs,
    warmup,
    threads,
    tiny,
    device,
    compiled=False,
    gradient_checkpointing=False,
) -> CaseResult:
    """Time one case in this process (meant to run in a fresh subprocess)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    model = random_preset_model(preset, num_classes, tiny).to(device)
    model.train(training)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    if compiled:
        # In place, so that the label-map path below runs the compiled image tower and head.
        model.clip_rc.vision_model.compile()
        model.decode_head.compile()
    step = _case_step(model, batch_size, training, AUTOCAST_DTYPES.get(dtype), device)
    if compiled:
        step()  # compilation happens here, outside the timings
    seconds = _median_seconds(step, runs, warmup, device) / batch_size
    # Read before counting FLOPs: a step under the counter's dispatch mode takes far more memory than the timed
    # steps (train-171 with checkpointing: 4.8 GB against 2.1 GB), and the peak is the process's high-water mark.
    peak_mb = peak_memory_mb(device)
    gflop_per_crop = count_flops(step) / batch_size / 1e9
    return CaseResult(
        name, preset, num_classes, training, dtype, batch_size, compiled, seconds, 1 / seconds, peak_mb,
        gflop_per_crop, gflop_per_crop / seconds, gradient_checkpointing,
    )  # fmt: skip


def _case_step(model, batch_size: int, training: bool, autocast_dtype, device: torch.device) -> Callable[[], None]:
    """One step of a case on random crops: a training step (forward, losses, backward, AdamW update), or the label
    maps of the crops through the one inference path."""
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    crop, num_classes = model.config.crop_size, model.config.num_labels
    pixel_values = torch.randn(batch_size, 3, crop, crop, device=device)
    labels = torch.randint(0, num_classes, (batch_size, crop, crop), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if training else None

    def step():
        # Inference without autograd, as evaluation, prediction and the pipelines run it.
        with (
            torch.set_grad_enabled(training),
            torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            if training:
                loss = model(pixel_values, labels=labels).loss
            else:
                # What inference delivers: the crop's label map (calibrated sigmoid scores, arg-max over classes).
                image_processor.post_process_semantic_segmentation(model(pixel_values=pixel_values))
        if training:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def _median_seconds(step: Callable[[], None], runs: int, warmup: int, device: torch.device) -> float:
    """The median wall time of `runs` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    timings = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


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
        raise RuntimeError(
            f"benchmark case {kwargs['name']} ({kwargs['dtype']}, batch {kwargs['batch_size']}): {result['error']}"
        )
    return result


def _mode(result: dict) -> str:
    mode = "compiled" if result["compiled"] else "eager"
    return mode + "+ckpt" if result.get("gradient_checkpointing") else mode


def format_table(results: list[dict], peaks: dict[str, float]) -> str:
    header = f"{'case':<16}{'mode':<11}{'dtype':<6}{'batch':>6}{'s/crop':>9}{'crops/s':>9}{'peak MB':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'% peak':>8}"
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(
            f"{result['name']:<16}{_mode(result):<11}{result['dtype']:<6}{result['batch_size']:>6}{result['seconds_per_crop']:>9.3f}"
            f"{result['crops_per_second']:>9.2f}{result['peak_memory_mb']:>9.0f}{result['gflop_per_crop']:>9.1f}"
            f"{result['achieved_gflops']:>9.1f}{100 * result['fraction_of_peak']:>7.0f}%"
        )
    lines.append("matmul peak (GFLOP/s): " + ", ".join(f"{key} {value:.0f}" for key, value in peaks.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=[case[0] for case in DEFAULT_CASES],
                        choices=[case[0] for case in DEFAULT_CASES], metavar="CASE",
                        help="any of " + ", ".join(case[0] for case in DEFAULT_CASES))  # fmt: skip
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "auto"], choices=["fp32", "auto", "bf16", "fp16"],
                        help="auto: bf16 where the processor multiplies bf16 fast, fp32 elsewhere")  # fmt: skip
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
    return parser


def _resolve_dtypes(args: argparse.Namespace) -> list[str]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # --dtypes auto times its bf16 matmul with the benchmark's threads
    try:
        return list(dict.fromkeys(resolve_dtype(dtype, args.device) for dtype in args.dtypes))
    finally:
        torch.set_num_threads(previous_threads)


def _run_cases(args: argparse.Namespace, dtypes: list[str]) -> list[dict]:
    """Every case x dtype x batch size (x compiled / checkpointed variants), each in a fresh subprocess."""
    known = {case[0]: case for case in DEFAULT_CASES}
    results = []
    for name in args.cases:
        _, preset, num_classes, training = known[name]
        variants = [(False, False)]
        if args.compile and not training:
            variants.append((True, False))
        if args.gradient_checkpointing and training:
            variants.append((False, True))
        for dtype in dtypes:
            for batch_size in args.batch_sizes:
                for compiled, checkpointing in variants:
                    logger.info("running %s %s batch %d%s%s", name, dtype, batch_size, " compiled" if compiled else "",
                                " with gradient checkpointing" if checkpointing else "")  # fmt: skip
                    results.append(run_in_subprocess(
                        name=name, preset=preset, num_classes=num_classes, training=training, dtype=dtype,
                        batch_size=batch_size, runs=args.runs, warmup=args.warmup, threads=args.threads,
                        tiny=args.tiny, device=args.device, compiled=compiled, gradient_checkpointing=checkpointing,
                    ))  # fmt: skip
    return results


def run_benchmark(argv: list[str] | None = None) -> dict:
    """Time the cases of the command line `argv` (see `--help`); prints the table and returns the report (also
    written to `--json`)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    dtypes = _resolve_dtypes(args)
    peaks = {
        dtype: matmul_peak_gflops({"fp32": torch.float32, **AUTOCAST_DTYPES}[dtype], args.threads, args.device)
        for dtype in sorted(set(dtypes) | {"fp32"})
    }
    results = _run_cases(args, dtypes)
    for result in results:
        result["fraction_of_peak"] = result["achieved_gflops"] / peaks[result["dtype"]]
    report = {
        "machine": {**cpu_description(), "threads": args.threads, "device": args.device},
        "matmul_peak_gflops": peaks,
        "results": results,
    }
    machine = f"{format_cpu_description(report['machine'])}; {args.threads} threads on {args.device}"
    sys.stdout.write(machine + "\n" + format_table(results, peaks) + "\n")
    if args.json:
        write_json_atomic(args.json, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """`clip-rc-benchmark`: see [`run_benchmark`]; returns the exit status, 0 on success (errors raise)."""
    run_benchmark(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
