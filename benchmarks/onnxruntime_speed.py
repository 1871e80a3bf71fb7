"""ONNX Runtime against PyTorch on one full-size crop, side by side in one process (the README's Deploy figures).

The preset's model with random weights and class embeddings (no download) is exported to ONNX through
`clip_rc.commands.export.export_segmentation_model`; then PyTorch eager and the ONNX Runtime session, both limited to
`--threads`, run the same crop in turns (so a change of machine load hits both alike), after one warm-up run each.
It prints the median seconds per crop of each, the largest logit difference and the machine's load averages.

    python benchmarks/onnxruntime_speed.py --preset voc-inductive --threads 2 --runs 5
"""

import argparse
import logging
import os
import statistics
import time

import torch

from clip_rc import CLIPRCForSemanticSegmentation
from clip_rc.commands.export import export_segmentation_model
from clip_rc.profiling import random_preset_model
from clip_rc.utils import setup_logging


logger = logging.getLogger("benchmarks.onnxruntime_speed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="voc-inductive")
    parser.add_argument("--threads", type=int, default=2, help="Threads of PyTorch and of ONNX Runtime.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs of each backend.")
    return parser.parse_args()


def onnxruntime_runner(model: CLIPRCForSemanticSegmentation, threads: int):
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads
    exported = export_segmentation_model(model, "onnx")
    return exported.to(session_options=session_options).runners["model"]


def timed(function) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = function().logits
    return time.perf_counter() - start, logits


def main():
    args = parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = random_preset_model(args.preset).eval()
    runner = onnxruntime_runner(model, args.threads)
    crop = model.config.crop_size
    pixel_values, text_embeds = torch.randn(1, 3, crop, crop), model.class_embeddings
    backends = {
        "PyTorch (eager)": lambda: model(pixel_values=pixel_values),
        "ONNX Runtime": lambda: runner(pixel_values=pixel_values, text_embeds=text_embeds),
    }
    times = {name: [] for name in backends}
    logits = {}
    with torch.no_grad():
        for name, function in backends.items():
            _, logits[name] = timed(function)
        for run in range(args.runs):
            for name, function in backends.items():
                seconds, _ = timed(function)
                times[name].append(seconds)
            logger.info(
                f"run {run + 1}/{args.runs}: "
                + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
            )
    difference = (logits["PyTorch (eager)"] - logits["ONNX Runtime"]).abs().max().item()
    print(
        f"{args.preset}, one {crop}x{crop} crop, {model.config.num_labels} classes, {args.threads} threads, {args.runs} runs"
    )
    print("| backend | median s / crop | min | max |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"largest logit difference {difference:.2e}; load averages (1, 5, 15 min) at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
