# Copyright 2024 The CLIP-RC authors and the clip-rc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Open-vocabulary prediction with a CLIP-RC model: `clip-rc-predict`.

```bash
clip-rc-predict --model path/or/hub-id --classes "cat,dog,grass" image.jpg [more images] --output_dir out/
```

For every image, `out/<stem>_labels.png` is the label map (a paletted PNG whose pixel values are class indices into
the class list) and `out/<stem>_overlay.png` the image blended with the class colours, with a legend (colour swatch
and name of every predicted class) drawn in its top-left corner; both have the size of the input image.

Class names given with `--classes` are encoded at run time by the model's text tower, with the model's prompt
templates (`config.prompt_templates`) and the tokenizer saved beside the model: no retraining. Without `--classes`
the model's own classes are used (the class embeddings persisted in the checkpoint), with the reference's calibration
of the seen classes. Prediction follows the reference test protocol: short side resized to the model's crop size,
sliding windows, averaged scores, bilinear resize back to the image size, argmax.

This module also holds the helpers the evaluation script shares: loading a model with its image processor and
tokenizer, encoding class names, palettes, overlays and legends.
"""

from __future__ import annotations

import argparse
import colorsys
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from transformers.utils import logging as hf_logging

from .benchmarks import BENCHMARKS, get_benchmark
from .modeling_clip_rc import tokenize_class_prompts
from .processing_clip_rc import CLIPRCImageProcessor, CLIPRCProcessor
from .utils import setup_logging


logger = hf_logging.get_logger("clip_rc.predict")

__all__ = [
    "class_palette",
    "colorize_label_map",
    "draw_legend",
    "encode_class_names",
    "load_model_and_processor",
    "main",
    "overlay_label_map",
    "predict_label_map",
    "save_label_map",
]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    processor_name_or_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.nn.Module, Any, Any]:
    """
    Load a CLIP-RC model with its image processor and tokenizer.

    The model loads through `AutoModelForSemanticSegmentation` (a local folder saved by this package resolves once
    `clip_rc` is imported; a Hub id with custom code needs `trust_remote_code=True`). The processor is read from
    `processor_name_or_path` (default: the model's folder / id): a saved [`CLIPRCProcessor`] if there is one, else
    the tokenizer alone (`AutoTokenizer`) and a [`CLIPRCImageProcessor`] saved there or, failing that, a default one
    whose short side is the model's crop size.

    Returns:
        `(model, image_processor, tokenizer)`: the model in eval mode on `device`; `tokenizer` is `None` when none
        is found (the model then segments with its own persisted classes only).
    """
    from transformers import AutoModelForSemanticSegmentation, AutoTokenizer

    model = AutoModelForSemanticSegmentation.from_pretrained(
        os.fspath(model_name_or_path), trust_remote_code=trust_remote_code
    )
    if not hasattr(model, "sliding_window_scores"):
        raise ValueError(f"{model_name_or_path} is a {type(model).__name__}, not a CLIP-RC model.")
    model.eval()
    if device is not None:
        model.to(device)

    source = os.fspath(processor_name_or_path if processor_name_or_path is not None else model_name_or_path)
    image_processor = tokenizer = None
    try:
        processor = CLIPRCProcessor.from_pretrained(source)
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
    except Exception as error:  # noqa: BLE001 - any missing / foreign processor falls back to its parts
        logger.info(f"No CLIP-RC processor at {source} ({type(error).__name__}); loading its parts.")
        if trust_remote_code:
            try:
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
                image_processor = getattr(processor, "image_processor", None)
                tokenizer = getattr(processor, "tokenizer", None)
            except Exception:  # noqa: BLE001
                pass
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception:  # noqa: BLE001
            logger.warning(f"No tokenizer found at {source}: only the model's own classes can be used.")
    if image_processor is None:
        try:
            image_processor = CLIPRCImageProcessor.from_pretrained(source)
        except Exception:  # noqa: BLE001
            crop = model.config.crop_size
            image_processor = CLIPRCImageProcessor(
                size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}
            )
    return model, image_processor, tokenizer


def encode_class_names(
    model, tokenizer, class_names: Sequence[str], templates: Sequence[str] | None = None
) -> torch.Tensor:
    """
    `(C, E)` normalised class embeddings of `class_names`, encoded by the model's text tower: every name in every
    template (default: the model's `config.prompt_templates`), per-template embeddings averaged and renormalised.
    """
    if tokenizer is None:
        raise ValueError(
            "Encoding class names needs the model's tokenizer; none was found beside the model. Pass a processor "
            "(or tokenizer) folder."
        )
    templates = list(templates) if templates else list(model.config.prompt_templates)
    prompts = tokenize_class_prompts(tokenizer, list(class_names), templates)
    device = model.class_embeddings.device
    return model.encode_text(prompts["input_ids"].to(device), prompts["attention_mask"].to(device))


# ----------------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_label_map(
    model,
    image_processor,
    image: PIL.Image.Image,
    text_embeds: torch.Tensor | None = None,
    windows_per_batch: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Segment one image with the reference protocol.

    Returns:
        `(label_map, scores)`: a `(H, W)` long tensor of class indices at the image's size and the `(C, H, W)`
        calibrated scores.
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    crop = model.config.crop_size
    inputs = image_processor(image, size={"shortest_edge": crop}, return_tensors="pt")
    device = model.class_embeddings.device
    pixel_values = inputs["pixel_values"].to(device=device, dtype=model.dtype)
    scores = model.sliding_window_scores(
        pixel_values,
        text_embeds=text_embeds,
        output_size=(image.height, image.width),
        windows_per_batch=windows_per_batch,
    )[0]
    return scores.argmax(dim=0).cpu(), scores.cpu()


# ----------------------------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------------------------


def _generated_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours: hues spaced by the golden ratio, alternating saturation and value."""
    colours = []
    for index in range(num_classes):
        hue = (index * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6)[index % 2]
        value = (0.95, 0.75, 0.55)[(index // 2) % 3]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((int(red * 255), int(green * 255), int(blue * 255)))
    return colours


def class_palette(class_names: Sequence[str], benchmark: str | None = None) -> list[tuple[int, int, int]]:
    """
    One RGB colour per class: the benchmark's palette when `class_names` are exactly that benchmark's classes (the
    named `benchmark`, or any known benchmark with these names), generated distinct colours otherwise.
    """
    names = tuple(class_names)
    candidates = [benchmark] if benchmark in BENCHMARKS else []
    candidates += [name for name in BENCHMARKS if name not in candidates]
    for name in candidates:
        known = get_benchmark(name)
        if known.class_names == names:
            return [tuple(colour) for colour in known.palette]
    return _generated_palette(len(names))


def colorize_label_map(label_map: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]]) -> PIL.Image.Image:
    """RGB image of a `(H, W)` label map; ids outside the palette (e.g. 255 = ignore) are black."""
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    table = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return PIL.Image.fromarray(table[labels.astype(np.int64)])


def save_label_map(label_map: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]], path: str | os.PathLike):
    """
    Save a label map as a PNG whose pixel values are the class indices: paletted (mode "P", the class colours) for
    up to 256 classes, 16-bit grayscale beyond.
    """
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if labels.size and labels.max() > 255:
        PIL.Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    image = PIL.Image.fromarray(labels.astype(np.uint8))
    flat = [channel for colour in palette[:256] for channel in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))  # an "L" image becomes "P" with the same values
    image.save(path)


def draw_legend(
    image: PIL.Image.Image, entries: Sequence[tuple[str, Sequence[int]]], margin: int = 4
) -> PIL.Image.Image:
    """
    Draw a legend (one colour swatch and class name per entry) on a dark translucent box in the top-left corner of
    `image`, in place; rows that do not fit the image are left out. Returns `image`.
    """
    if not entries:
        return image
    font = PIL.ImageFont.load_default()
    draw = PIL.ImageDraw.Draw(image, "RGBA")
    text_boxes = [draw.textbbox((0, 0), name, font=font) for name, _ in entries]
    row_height = max(box[3] for box in text_boxes) + 2
    swatch = row_height - 2
    width = margin * 3 + swatch + max(box[2] for box in text_boxes)
    fitting = max(1, min(len(entries), (image.height - margin) // (row_height + 1)))
    height = margin * 2 + fitting * (row_height + 1)
    draw.rectangle((0, 0, width, height), fill=(0, 0, 0, 150))
    for row, (name, colour) in enumerate(entries[:fitting]):
        top = margin + row * (row_height + 1)
        draw.rectangle(
            (margin, top, margin + swatch, top + swatch), fill=tuple(int(c) for c in colour), outline=(255, 255, 255)
        )
        draw.text((margin * 2 + swatch, top), name, fill=(255, 255, 255), font=font)
    return image


def overlay_label_map(
    image: PIL.Image.Image,
    label_map: np.ndarray | torch.Tensor,
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> PIL.Image.Image:
    """
    The image blended (`alpha`) with the colours of its label map, same size as the image. With `class_names`, a
    legend of the classes present (most frequent first) is drawn in the top-left corner.
    """
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    colours = colorize_label_map(labels, palette)
    overlay = PIL.Image.blend(image.convert("RGB"), colours, alpha)
    if class_names is not None:
        ids, counts = np.unique(labels, return_counts=True)
        by_area = ids[np.argsort(-counts, kind="stable")]
        present = [int(class_id) for class_id in by_area if class_id < len(class_names)]
        draw_legend(overlay, [(class_names[class_id], palette[class_id]) for class_id in present])
    return overlay


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _split_class_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"--classes holds no class name: {text!r}.")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"--classes repeats {duplicated}.")
    return names


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
        help='Comma-separated class names, e.g. "cat,dog,grass" (default: the model\'s own classes).',
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="Prompt templates with one '{}' (default: the model's config.prompt_templates).",
    )
    parser.add_argument("--output_dir", default="predictions", help="Where the PNG files are written.")
    parser.add_argument("--alpha", type=float, default=0.5, help="Opacity of the class colours in the overlay.")
    parser.add_argument("--no_legend", action="store_true", help="Do not draw the legend on the overlays.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    parser.add_argument("--windows_per_batch", type=int, default=4, help="Sliding windows run per forward pass.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model's own code from the Hub.")
    return parser


def _output_stems(paths: Sequence[str]) -> list[str]:
    """File stems, made unique with a numeric suffix when two images share one."""
    stems, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-rc-predict`; returns the exit status, 0 on success."""
    from tqdm.auto import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}.")
    try:
        class_names = _split_class_names(args.classes) if args.classes is not None else None
    except ValueError as error:
        parser.error(str(error))
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"image file(s) not found: {missing}")
    setup_logging()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, image_processor, tokenizer = load_model_and_processor(
        args.model, args.processor, trust_remote_code=args.trust_remote_code, device=device
    )
    if class_names is None:
        class_names, text_embeds = model.config.class_names, None
        palette = class_palette(class_names, model.config.benchmark)
    else:
        text_embeds = encode_class_names(model, tokenizer, class_names, args.templates)
        palette = class_palette(class_names)
    logger.info(f"Segmenting {len(args.images)} image(s) into {len(class_names)} classes: {', '.join(class_names)}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path, stem in zip(tqdm(args.images, desc="segmenting"), _output_stems(args.images)):
        with PIL.Image.open(path) as opened:
            image = opened.convert("RGB")
        label_map, _ = predict_label_map(model, image_processor, image, text_embeds, args.windows_per_batch)
        label_path, overlay_path = output_dir / f"{stem}_labels.png", output_dir / f"{stem}_overlay.png"
        save_label_map(label_map, palette, label_path)
        overlay = overlay_label_map(
            image, label_map, palette, None if args.no_legend else class_names, alpha=args.alpha
        )
        overlay.save(overlay_path)
        ids, counts = torch.unique(label_map, return_counts=True)
        fractions = {class_names[int(i)]: round(int(c) / label_map.numel(), 6) for i, c in zip(ids, counts)}
        records.append(
            {"image": str(path), "label_map": str(label_path), "overlay": str(overlay_path), "classes": fractions}
        )
        logger.info(f"{path}: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in fractions.items()))
    return 0


if __name__ == "__main__":
    main()
