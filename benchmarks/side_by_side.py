"""
Speed and memory of this project's CLIP-RC beside the authors' reference modules, on the same work, on this CPU.

    export CLIP_RC_MIRROR=/path/to/a/git/dir/of/uyzhang/CLIP-RC    # a clone or a bare mirror
    python benchmarks/side_by_side.py                               # every case, 2 threads
    python benchmarks/side_by_side.py eval-1000 train-156 --threads 2 --rounds 3

Cases (one 512x512 crop, batch 1, random weights at full size, the same inputs on both sides):
  eval-C     the label map of the crop for C classes (20: VOC with 10 prompt tokens; 171, 1000: COCO-Stuff with 100).
             Reference: its image tower and decode head (calibrated scores), arg-max over the classes.
             Ours: `model(pixel_values=...)` then `CLIPRCImageProcessor.post_process_semantic_segmentation`.
  train-156  one training step at COCO-Stuff size (156 seen of 171 classes in the head): forward, losses, backward,
             with what the reference trains (prompts and decode head; CLIP frozen).

Each (case, side) runs in a fresh process (so that its peak RSS is its own): one warm-up step, then the best of two
timed steps; sides alternate over `--rounds` rounds and each side keeps its best. `x` is reference time / our time
(> 1: we are faster); memory is our peak RSS / the reference's. The output starts with a description of the machine
and its load, and ends with a Markdown table for the README.

The reference's code is read from `CLIP_RC_MIRROR` (see `reference_modules.py`); without it this script says so and
exits with status 2.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import reference_modules
import torch
import torch.nn.functional as F

from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor
from clip_rc.precision import autocast, cpu_description, format_cpu_description, resolve_dtype
from clip_rc.profiling import OPEN_VOCABULARY_IGNORE_INDEX


CROP = 512
EMBED_DIM = 512


@dataclass(frozen=True)
class Case:
    preset: str
    num_classes: int
    training: bool

    @property
    def num_prompt_tokens(self) -> int:
        return CLIPRCConfig.from_preset(self.preset).num_prompt_tokens


CASES = {
    "eval-20": Case("voc-inductive", 20, training=False),
    "eval-171": Case("coco-stuff-inductive", 171, training=False),
    "eval-1000": Case("coco-stuff-inductive", 1000, training=False),
    "train-156": Case("coco-stuff-inductive", 171, training=True),
}


@dataclass
class Inputs:
    pixel_values: torch.Tensor
    class_embeds: torch.Tensor
    seen_class_ids: list[int]
    head_labels: torch.Tensor  # (1, H, W) head channel ids of the seen classes (the reference's training labels)


def make_inputs(case: Case) -> Inputs:
    """The same crop, class embeddings and labels on both sides: every class seen in evaluation (the reference
    calibrates them all, and so does our model with its own classes), the preset's seen classes in training."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, CROP, CROP, generator=generator)
    class_embeds = F.normalize(torch.randn(case.num_classes, EMBED_DIM, generator=generator), dim=-1)
    if case.training:
        seen_class_ids = CLIPRCConfig.from_preset(case.preset).resolved_seen_class_ids
    else:
        seen_class_ids = list(range(case.num_classes))
    head_labels = torch.randint(0, len(seen_class_ids), (1, CROP, CROP), generator=generator)
    return Inputs(pixel_values, class_embeds, seen_class_ids, head_labels)


def reference_step(case: Case, inputs: Inputs) -> Callable[[], None]:
    """One step of the reference modules (eval: label map; training: forward, losses, backward)."""
    config = CLIPRCConfig.from_preset(case.preset)
    loss_weights = (config.mask_loss_weight, config.dice_loss_weight, config.recovery_loss_weight)
    image_tower, decode_head = reference_modules.build_reference_model(
        case.num_prompt_tokens, inputs.seen_class_ids, list(range(case.num_classes)), loss_weights
    )
    if not case.training:
        image_tower.eval()
        decode_head.eval()

        @torch.no_grad()
        def step():
            decode_head.forward([image_tower(inputs.pixel_values), inputs.class_embeds], self_training=False).argmax(1)

        return step

    image_tower.train()
    decode_head.train()
    for name, parameter in image_tower.named_parameters():
        parameter.requires_grad_("prompt" in name)  # what the reference's segmentor leaves trainable
    trainable = [p for module in (image_tower, decode_head) for p in module.parameters() if p.requires_grad]
    seen_embeds = inputs.class_embeds[inputs.seen_class_ids]

    def step():
        # The reference rewrites its label tensor in place: give it a fresh one every step.
        labels = inputs.head_labels[:, None].clone()
        losses = decode_head.forward_train([image_tower(inputs.pixel_values), seen_embeds], None, labels, None,
                                           self_training=False)  # fmt: skip
        sum(value for key, value in losses.items() if "loss" in key).backward()
        for parameter in trainable:
            parameter.grad = None

    return step


def our_step(case: Case, inputs: Inputs, dtype: str) -> Callable[[], None]:
    """One step of this project's model through its public API (eval: the one inference path)."""
    overrides = {}
    if not case.training:
        overrides = {
            "id2label": {i: f"class {i}" for i in range(case.num_classes)},
            "seen_class_ids": inputs.seen_class_ids,
            "ignore_index": OPEN_VOCABULARY_IGNORE_INDEX,  # 255 is a class id at 1000 classes
        }
    config = CLIPRCConfig.from_preset(case.preset, **overrides)
    model = CLIPRCForSemanticSegmentation(config)  # built frozen as the reference trains (freeze_clip)
    model.set_class_embeddings(inputs.class_embeds)
    if not case.training:
        model.eval()
        image_processor = CLIPRCImageProcessor.from_model_config(config)

        @torch.no_grad()
        def step():
            with autocast(dtype):
                outputs = model(pixel_values=inputs.pixel_values)
            image_processor.post_process_semantic_segmentation(outputs)

        return step

    model.train()
    labels = torch.tensor(inputs.seen_class_ids)[inputs.head_labels]  # the same pixels, as dataset class ids
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def step():
        with autocast(dtype):
            loss = model(pixel_values=inputs.pixel_values, labels=labels).loss
        loss.backward()
        for parameter in trainable:
            parameter.grad = None

    return step


def time_side(case_name: str, side: str, threads: int, dtype: str, clock: Callable[[], float]) -> dict:
    """Run in a fresh process: warm-up, best of two timed steps (by `clock`), peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    case = CASES[case_name]
    inputs = make_inputs(case)
    step = reference_step(case, inputs) if side == "reference" else our_step(case, inputs, dtype)
    step()
    timings = []
    for _ in range(2):
        start = clock()
        step()
        timings.append(clock() - start)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"seconds": min(timings), "peak_rss_gb": peak_rss_gb}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_side_in_subprocess(case_name: str, side: str, args: argparse.Namespace, dtype: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), case_name, "--side", side, "--threads", str(args.threads),
               "--dtype", dtype, "--clock", args.clock]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{case_name}, {side} side failed: {last_line}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_case(case_name: str, args: argparse.Namespace, dtype: str) -> dict[str, dict]:
    """Each side's best run over `args.rounds` rounds, the sides alternating."""
    best = {}
    for _ in range(args.rounds):
        for side in ("reference", "ours"):
            run = run_side_in_subprocess(case_name, side, args, dtype)
            if side not in best or run["seconds"] < best[side]["seconds"]:
                best[side] = run
    return best


def machine_lines(args: argparse.Namespace, dtype: str) -> list[str]:
    git_dir = reference_modules.reference_git_dir()
    return [
        f"machine: {format_cpu_description(cpu_description())}",
        f"{args.threads} threads, {args.clock} clock, our dtype {dtype}; reference: uyzhang/CLIP-RC at "
        f"{reference_modules.reference_commit(git_dir)[:12]}",
        "load average at start: " + " ".join(f"{value:.2f}" for value in os.getloadavg()),
    ]


def case_line(case_name: str, best: dict[str, dict]) -> str:
    reference, ours = best["reference"], best["ours"]
    return (
        f"{case_name:<10} reference {reference['seconds']:6.2f} s {reference['peak_rss_gb']:5.2f} GB | ours "
        f"{ours['seconds']:6.2f} s {ours['peak_rss_gb']:5.2f} GB | x{reference['seconds'] / ours['seconds']:.2f} time, "
        f"memory {ours['peak_rss_gb'] / reference['peak_rss_gb']:.2f} of the reference"
    )


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| case | reference s | reference GB | ours s | ours GB | x (ref / ours) | memory (ours / ref) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for case_name, best in results.items():
        reference, ours = best["reference"], best["ours"]
        lines.append(
            f"| {case_name} | {reference['seconds']:.2f} | {reference['peak_rss_gb']:.2f} | {ours['seconds']:.2f} | "
            f"{ours['peak_rss_gb']:.2f} | x{reference['seconds'] / ours['seconds']:.2f} | "
            f"{ours['peak_rss_gb'] / reference['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="case", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides; each side keeps its best run")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "auto", "bf16"],
                        help="our side's precision (the reference runs fp32); the targets are fp32")  # fmt: skip
    parser.add_argument(
        "--clock", default="wall", choices=list(CLOCKS),
        help="wall: elapsed seconds (the figures to report); cpu: this process's CPU seconds, a steadier comparison "
        "on a busy machine with --threads 1",
    )  # fmt: skip
    parser.add_argument("--side", choices=["reference", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    args.cases = args.cases or list(CASES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reference_modules.export_reference_models(reference_modules.reference_git_dir())
    except reference_modules.MissingReferenceError as error:
        sys.stderr.write(f"side_by_side: the reference source is needed: {error}\n")
        return 2
    dtype = resolve_dtype(args.dtype)
    if args.side is not None:
        (case_name,) = args.cases
        sys.stdout.write(json.dumps(time_side(case_name, args.side, args.threads, dtype, CLOCKS[args.clock])) + "\n")
        return 0

    sys.stdout.write("\n".join(machine_lines(args, dtype)) + "\n")
    results = {}
    for case_name in args.cases:
        results[case_name] = measure_case(case_name, args, dtype)
        sys.stdout.write(case_line(case_name, results[case_name]) + "\n")
        sys.stdout.flush()
    sys.stdout.write("load average at end: " + " ".join(f"{value:.2f}" for value in os.getloadavg()) + "\n")
    ratios = " ".join(f"{name}=x{b['reference']['seconds'] / b['ours']['seconds']:.2f}" for name, b in results.items())
    sys.stdout.write(f"ratios {ratios}\n\n{markdown_table(results)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
