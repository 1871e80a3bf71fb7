"""How often bf16 autocast's label maps equal fp32's, on a full-size random model (the README's Precision figures).

The preset's model with random weights and `--num_classes` random class embeddings (no download) labels `--crops`
random 512 x 512 crops through the one inference path (model, then the image processor's post-processing) in fp32,
then with bf16 autocast over the whole model, over all but the decode head, and over the image tower's feed-forward
layers only. It prints, per variant, the share of pixels whose label equals fp32's, the logits' error (standard
deviation of the difference from fp32's logits over that of fp32's logits) and the seconds per crop. The share depends
on the random model (`--seed`): its logits are large, and labels turn on small differences (see the README).

    python benchmarks/bf16_agreement.py --preset coco-stuff-inductive --num_classes 171 --crops 3 --threads 2
"""

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import torch

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
def forwards_under_autocast(modules: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Within the block, each module's forward runs with bf16 autocast on (`enabled`) or off, its tensor output cast to
    fp32 (the model's modules around it run in fp32 when autocast is off)."""
    for module in modules:

        def forward(*args, _forward=module.forward, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                outputs = _forward(*args, **kwargs)
            return outputs.float() if isinstance(outputs, torch.Tensor) else outputs

        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def label_maps(model, processor, crops: list[torch.Tensor], dtype: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The label maps and logits of `crops` and the seconds per crop."""
    labels, logits, start = [], [], time.perf_counter()
    with torch.no_grad():
        for crop in crops:
            with autocast(dtype):
                outputs = model(pixel_values=crop)
            labels.append(processor.post_process_semantic_segmentation(outputs)[0])
            logits.append(outputs.logits.float())
    return torch.stack(labels), torch.cat(logits), (time.perf_counter() - start) / len(crops)


def measure(args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """`{variant: (agreement with fp32 in [0, 1], relative logit error, seconds per crop)}`, fp32 itself included."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = random_preset_model(args.preset, num_classes=args.num_classes, tiny=args.tiny).eval()
    processor = CLIPRCImageProcessor.from_model_config(model.config)
    crop_size = processor.crop_size["height"]
    generator = torch.Generator().manual_seed(args.seed)
    crops = [torch.randn(1, 3, crop_size, crop_size, generator=generator) for _ in range(args.crops)]
    expected, expected_logits, fp32_seconds = label_maps(model, processor, crops, "fp32")
    results = {"fp32": (1.0, 0.0, fp32_seconds)}
    feed_forward_layers = [layer.mlp for layer in model.clip_rc.vision_model.encoder.layers]
    variants = {
        "bf16": ("bf16", contextlib.nullcontext()),
        "bf16, decode head fp32": ("bf16", forwards_under_autocast([model.decode_head], enabled=False)),
        "bf16 in the tower's feed-forward layers only": (
            "fp32",
            forwards_under_autocast(feed_forward_layers, enabled=True),
        ),
    }
    for variant, (dtype, context) in variants.items():
        with context:
            labels, logits, seconds = label_maps(model, processor, crops, dtype)
        error = ((logits - expected_logits).std() / expected_logits.std()).item()
        results[variant] = ((labels == expected).float().mean().item(), error, seconds)
    return results


def report(args: argparse.Namespace, results: dict[str, tuple[float, float, float]]) -> str:
    """What was measured, then a Markdown table of the variants."""
    classes = args.num_classes or "the preset's"
    lines = [
        f"{args.preset}, {classes} classes, {args.crops} crops, seed {args.seed}, {args.threads} threads",
        "| variant | pixels equal to fp32 | logit error | s / crop |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {variant} | {agreement:.2%} | {error:.2%} | {seconds:.2f} |"
        for variant, (agreement, error, seconds) in results.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    setup_logging()
    args = parse_args(argv)
    sys.stdout.write(report(args, measure(args)) + "\n")


if __name__ == "__main__":
    main()
