"""How often bf16 autocast's label maps equal fp32's (the README's Precision figures).

By default, on a full-size random model: the preset's model with random weights and `--num_classes` random class
embeddings (no download) labels `--crops` random 512 x 512 crops. With `--model` (a saved CLIP-RC folder, such as a
training run's) and `--dataset` (a local or Hub segmentation dataset, as `clip-rc-eval` reads it), that model labels the
first `--images` images of `--split` at their own size, with its own classes. Either way the labels come from the one
inference path (processor, model, the processor's post-processing), in fp32, then with bf16 autocast over the whole
model, over all but the decode head, and over the image tower's feed-forward layers only. It prints, per variant, the
share of pixels whose label equals fp32's, the logits' error (standard deviation of the difference from fp32's logits
over that of fp32's logits) and the seconds per image. A random model's share depends on its seed (`--seed`): its
logits are large, and labels turn on small differences (see the README).

    python benchmarks/bf16_agreement.py --preset coco-stuff-inductive --num_classes 171 --crops 3 --threads 2
    python benchmarks/bf16_agreement.py --model runs/voc-inductive --dataset /data/voc-hf --split validation --images 50
"""

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import torch

from clip_rc import CLIPRCForSemanticSegmentation, CLIPRCProcessor
from clip_rc.data import load_segmentation_dataset
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
    parser.add_argument("--model", help="A saved CLIP-RC folder (model and processor) instead of a random model.")
    parser.add_argument("--dataset", help="With --model: the dataset whose images it labels.")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--images", type=int, default=50, help="With --model: how many images of the split.")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.dataset is None):
        parser.error("--model and --dataset go together.")
    return args


def random_model_inputs(args: argparse.Namespace):
    """The random preset model, its image processor, and `--crops` random crops as `(model inputs, target sizes)`."""
    model = random_preset_model(args.preset, num_classes=args.num_classes, tiny=args.tiny)
    processor = CLIPRCImageProcessor.from_model_config(model.config)
    crop_size = processor.crop_size["height"]
    generator = torch.Generator().manual_seed(args.seed)
    crops = [torch.randn(1, 3, crop_size, crop_size, generator=generator) for _ in range(args.crops)]
    return model, processor, [({"pixel_values": crop}, None) for crop in crops]


def saved_model_inputs(args: argparse.Namespace):
    """The saved model, its processor, and the split's first `--images` images as `(model inputs, target sizes)`."""
    model = CLIPRCForSemanticSegmentation.from_pretrained(args.model)
    processor = CLIPRCProcessor.from_pretrained(args.model)
    split = load_segmentation_dataset(args.dataset, splits=args.split)[args.split]
    images = [split[index]["image"] for index in range(min(args.images, len(split)))]
    return model, processor, [(processor(images=image, return_tensors="pt"), [image.size[::-1]]) for image in images]


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


def label_maps(model, processor, inputs: list, dtype: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The label maps (flattened, concatenated) and logits of `inputs` and the seconds per input."""
    labels, logits, start = [], [], time.perf_counter()
    with torch.no_grad():
        for model_inputs, target_sizes in inputs:
            with autocast(dtype):
                outputs = model(**model_inputs)
            labels.append(
                processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0].flatten()
            )
            logits.append(outputs.logits.float().flatten())
    return torch.cat(labels), torch.cat(logits), (time.perf_counter() - start) / len(inputs)


def measure(args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """`{variant: (agreement with fp32 in [0, 1], relative logit error, seconds per input)}`, fp32 itself included."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor, inputs = (saved_model_inputs if args.model else random_model_inputs)(args)
    model.eval()
    expected, expected_logits, fp32_seconds = label_maps(model, processor, inputs, "fp32")
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
            labels, logits, seconds = label_maps(model, processor, inputs, dtype)
        error = ((logits - expected_logits).std() / expected_logits.std()).item()
        results[variant] = ((labels == expected).float().mean().item(), error, seconds)
    return results


def report(args: argparse.Namespace, results: dict[str, tuple[float, float, float]]) -> str:
    """What was measured, then a Markdown table of the variants."""
    classes = args.num_classes or "the preset's"
    measured = (
        f"{args.model}, the first {args.images} images of {args.dataset} ({args.split})"
        if args.model
        else f"{args.preset}, {classes} classes, {args.crops} crops, seed {args.seed}"
    )
    lines = [
        f"{measured}, {args.threads} threads",
        "| variant | pixels equal to fp32 | logit error | s / image |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {variant} | {agreement:.2%} | {error:.2%} | {seconds:.3f} |"
        for variant, (agreement, error, seconds) in results.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    setup_logging()
    args = parse_args(argv)
    sys.stdout.write(report(args, measure(args)) + "\n")


if __name__ == "__main__":
    main()
