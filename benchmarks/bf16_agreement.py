"""How often bf16 autocast's label maps equal fp32's, on a full-size random model (the README's Precision figures).

The preset's model with random weights and `--num_classes` random class embeddings (no download) labels `--crops`
random 512 x 512 crops through the one inference path (model, then the image processor's post-processing) in fp32,
then under bf16 autocast with the whole model in bf16 and with the decode head kept in fp32. It prints, per variant,
the share of pixels whose label equals fp32's and the seconds per crop. The share depends on the random model
(`--seed`): its logits are large, and most pixels' labels are ties of saturated sigmoids (see the README).

    python benchmarks/bf16_agreement.py --preset coco-stuff-inductive --num_classes 171 --crops 3 --threads 2
"""

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import torch

from clip_rc import CLIPRCForSemanticSegmentation
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor
from clip_rc.precision import autocast
from clip_rc.profiling import random_preset_model
from clip_rc.utils import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="voc-inductive")
    parser.add_argument("--num_classes", type=int, help="Default: the preset's classes.")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and crops.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model on 64 x 64 crops (seconds; for tests).")
    return parser.parse_args(argv)


@contextlib.contextmanager
def decode_head_in_fp32(model: CLIPRCForSemanticSegmentation) -> Iterator[None]:
    """Within the block, the decode head runs without autocast (it casts the tower's features to its fp32 weights)."""
    head_forward = model.decode_head.forward

    def forward_in_fp32(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return head_forward(*args, **kwargs)

    model.decode_head.forward = forward_in_fp32
    try:
        yield
    finally:
        del model.decode_head.forward


def label_maps(model, processor, crops: list[torch.Tensor], dtype: str) -> tuple[torch.Tensor, float]:
    """The label maps of `crops` and the seconds per crop."""
    labels, start = [], time.perf_counter()
    with torch.no_grad():
        for crop in crops:
            with autocast(dtype):
                outputs = model(pixel_values=crop)
            labels.append(processor.post_process_semantic_segmentation(outputs)[0])
    return torch.stack(labels), (time.perf_counter() - start) / len(crops)


def measure(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """`{variant: (agreement with fp32 in [0, 1], seconds per crop)}`, fp32 itself included."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = random_preset_model(args.preset, num_classes=args.num_classes, tiny=args.tiny).eval()
    processor = CLIPRCImageProcessor.from_model_config(model.config)
    crop_size = processor.crop_size["height"]
    generator = torch.Generator().manual_seed(args.seed)
    crops = [torch.randn(1, 3, crop_size, crop_size, generator=generator) for _ in range(args.crops)]
    expected, fp32_seconds = label_maps(model, processor, crops, "fp32")
    results = {"fp32": (1.0, fp32_seconds)}
    variants = {"bf16": contextlib.nullcontext, "bf16, decode head fp32": lambda: decode_head_in_fp32(model)}
    for variant, context in variants.items():
        with context():
            labels, seconds = label_maps(model, processor, crops, "bf16")
        results[variant] = ((labels == expected).float().mean().item(), seconds)
    return results


def report(args: argparse.Namespace, results: dict[str, tuple[float, float]]) -> str:
    """What was measured, then a Markdown table of the variants."""
    classes = args.num_classes or "the preset's"
    lines = [
        f"{args.preset}, {classes} classes, {args.crops} crops, seed {args.seed}, {args.threads} threads",
        "| variant | pixels equal to fp32 | s / crop |",
        "|---|---|---|",
    ]
    lines += [f"| {variant} | {agreement:.2%} | {seconds:.2f} |" for variant, (agreement, seconds) in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    setup_logging()
    args = parse_args(argv)
    sys.stdout.write(report(args, measure(args)) + "\n")


if __name__ == "__main__":
    main()
