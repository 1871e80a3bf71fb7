"""Open-vocabulary prediction with a CLIP-RC model: `clip-rc-predict`.

```bash
clip-rc-predict --model path/or/hub-id --classes "cat,dog,grass" image.jpg [more images] --output_dir out/
```

For every image, `out/<name>_labels.png` is the label map (a paletted PNG whose pixel values are class indices into
the class list) and `out/<name>_overlay.png` the image blended with the class colours, with a legend of the
predicted classes in its top-left corner; both have the size of the input image. `<name>` is the image's file stem,
made unique when several inputs share one; existing files are never replaced without `--overwrite`.

Class names given with `--classes` are encoded at run time by the model's text tower, with the model's prompt
templates (`config.prompt_templates`) and the tokenizer saved beside the model: no retraining. Without `--classes`
the model's own classes are used (the class embeddings persisted in the checkpoint), with the reference's calibration
of the seen classes. Images go through the one inference path ([`clip_rc.inference.segment_images`]). An image that
cannot be read is reported by name and skipped; the command then exits with status 1 after the others are done.

With `--backend onnxruntime`, `--model` is a `clip-rc-export --format onnx` folder, run by ONNX Runtime
([`clip_rc.exported_model.CLIPRCExportedModel`]) through the same processor and post-processing.
"""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..configuration_clip_rc import parse_class_names
from ..exported_model import load_exported_model_and_processor
from ..inference import encode_class_names, load_model_and_processor, segment_images
from ..precision import DTYPE_CHOICES, autocast, resolve_dtype
from ..utils import atomic_path, setup_logging
from ..visualization import class_palette, overlay_label_map, save_label_map


logger = logging.getLogger("clip_rc.commands.predict")

__all__ = ["main", "predict"]


@dataclass
class _Outputs:
    """The two files written for one input image."""

    image: str
    label_map: Path
    overlay: Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rc-predict",
        description="Segment images with a CLIP-RC model, for its own classes or class names given at run time.",
    )
    parser.add_argument("images", nargs="+", help="Image files to segment.")
    parser.add_argument("--model", required=True, help="Local folder or Hub id of a CLIP-RC model.")
    parser.add_argument(
        "--processor", default=None, help="Folder or Hub id of the processor / tokenizer (default: --model)."
    )
    parser.add_argument(
        "--classes",
        default=None,
        help='Comma-separated class names, e.g. "cat,dog,grass" (default: the model\'s own).',
    )
    parser.add_argument(
        "--templates", nargs="+", default=None, help="Prompt templates with one '{}' (default: the model's)."
    )
    parser.add_argument("--output_dir", default="predictions", help="Where the PNG files are written.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
    parser.add_argument("--alpha", type=float, default=0.5, help="Opacity of the class colours in the overlay.")
    parser.add_argument("--no_legend", action="store_true", help="Do not draw the legend on the overlays.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="fp32",
        help="fp32, bf16 / fp16 autocast, or auto: bf16 where the processor multiplies bf16 fast, fp32 elsewhere.",
    )  # fmt: skip
    parser.add_argument(
        "--backend",
        default="pytorch",
        choices=["pytorch", "onnxruntime"],
        help="pytorch: a model folder; onnxruntime: a `clip-rc-export --format onnx` folder.",
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model's own code from the Hub.")
    parser.add_argument("--allow_missing_weights", action="store_true",
                        help="Use a model whose checkpoint lacks weights (they are randomly initialised).")  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}.")
    if args.classes is not None:
        try:
            args.classes = list(parse_class_names(args.classes, field="--classes"))
        except ValueError as error:
            parser.error(f"--classes: {error}")
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"image file(s) not found: {missing}")
    return args


def output_paths(images: Sequence[str], output_dir: Path) -> list[_Outputs]:
    """Distinct output files per input: the file stem, with `_1`, `_2`, ... appended while the name is taken."""
    used, outputs = set(), []
    for image in images:
        stem = name = Path(image).stem
        suffix = 0
        while name in used:
            suffix += 1
            name = f"{stem}_{suffix}"
        used.add(name)
        outputs.append(_Outputs(image, output_dir / f"{name}_labels.png", output_dir / f"{name}_overlay.png"))
    return outputs


def _refuse_existing(outputs: list[_Outputs]):
    existing = [str(path) for output in outputs for path in (output.label_map, output.overlay) if path.exists()]
    if existing:
        raise FileExistsError(f"Output files exist already (pass --overwrite to replace them): {existing}")


def _read_image(path: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError, ValueError) as error:
        raise ValueError(f"Cannot read image {path}: {error}") from error


def _save_outputs(image, label_map, output: _Outputs, palette, class_names, alpha: float):
    with atomic_path(output.label_map) as temporary:
        save_label_map(label_map, palette, temporary)
    overlay = overlay_label_map(image, label_map, palette, class_names, alpha=alpha)
    with atomic_path(output.overlay) as temporary:
        overlay.save(temporary)


def _load_model_and_processor(args: argparse.Namespace):
    if args.backend == "onnxruntime":
        return load_exported_model_and_processor(args.model, args.processor, device=args.device, export_format="onnx")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model_and_processor(
        args.model,
        args.processor,
        trust_remote_code=args.trust_remote_code,
        device=device,
        allow_missing_weights=args.allow_missing_weights,
    )


def predict(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Segment `args.images`; returns one record per written image (paths, class shares) and the failures."""
    from tqdm.auto import tqdm

    model, image_processor, tokenizer = _load_model_and_processor(args)
    class_names, text_embeds = model.config.class_names, None
    palette = class_palette(class_names, model.config.benchmark)
    if args.classes is not None:
        class_names = args.classes
        text_embeds = encode_class_names(model, image_processor, tokenizer, class_names, args.templates)
        palette = class_palette(class_names)
    device = model.class_embeddings.device
    dtype = resolve_dtype(args.dtype, device)
    outputs = output_paths(args.images, Path(args.output_dir))
    if not args.overwrite:
        _refuse_existing(outputs)
    logger.info(f"Segmenting {len(outputs)} image(s) into {len(class_names)} classes: {', '.join(class_names)}")
    records, failures = [], []
    for output in tqdm(outputs, desc="segmenting"):
        try:
            image = _read_image(output.image)
        except ValueError as error:
            logger.error(str(error))
            failures.append(str(error))
            continue
        with autocast(dtype, device):
            label_map = segment_images(model, image_processor, [image], text_embeds=text_embeds)[0].cpu()
        _save_outputs(image, label_map, output, palette, None if args.no_legend else class_names, args.alpha)
        ids, counts = torch.unique(label_map, return_counts=True)
        shares = {class_names[int(i)]: round(int(c) / label_map.numel(), 6) for i, c in zip(ids, counts)}
        records.append(
            {
                "image": output.image,
                "label_map": str(output.label_map),
                "overlay": str(output.overlay),
                "classes": shares,
            }
        )
        logger.info(f"{output.image}: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items()))
    return records, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-rc-predict`: 0 when every image was segmented, 1 when any failed (listed at the end)."""
    args = parse_args(argv)
    setup_logging()
    try:
        _, failures = predict(args)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error(str(error))
        return 1
    if failures:
        logger.error(f"{len(failures)} of {len(args.images)} image(s) failed:\n" + "\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
