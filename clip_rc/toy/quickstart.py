"""The quickest end-to-end run of the library, offline: tiny CLIP -> CLIP-RC -> train -> segment -> save -> reload.

`python -m clip_rc.toy.quickstart --output_dir outputs/quickstart`
"""

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from ..configuration_clip_rc import CLIPRCConfig
from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
from ..utils import setup_logging
from .tiny_clip import TinyCLIPArguments, build_tiny_clip


logger = logging.getLogger("clip_rc.toy.quickstart")

CLASS_NAMES = ["red square", "green square", "blue square"]
CLASS_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220]], dtype=np.float32)
PIXEL_NOISE_STD = 25.0
# A random CLIP (never trained, so its text tower is never used): 2-layer, 64-wide towers, 16-pixel patches.
QUICKSTART_CLIP = TinyCLIPArguments(
    image_size=64, patch_size=16, vision_layers=2, text_layers=2, mlp_ratio=2, projection_dim=32, max_text_length=16
)
# Training: batches of 64x64 crops (one crop = one model input); then segmentation of wider images, which the image
# processor cuts into sliding windows of the crop size.
CROP_SIZE = QUICKSTART_CLIP.image_size
BATCH_SIZE = 4
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.01
NUM_TEST_IMAGES = 8
TEST_IMAGE_WIDTH = 2 * CROP_SIZE
SLIDING_WINDOW_STRIDE = 48


def quadrant_images(
    rng: np.random.Generator, count: int, height: int, width: int
) -> tuple[list[np.ndarray], torch.Tensor]:
    """RGB images (uint8, `(H, W, 3)`) made of four coloured quadrants, and their class-id maps `(count, H, W)`."""
    cells = rng.integers(0, len(CLASS_NAMES), size=(count, 2, 2))
    labels = cells.repeat(height // 2, 1).repeat(width // 2, 2)
    pixels = CLASS_COLOURS[labels] + rng.normal(0, PIXEL_NOISE_STD, size=(*labels.shape, 3))
    images = list(np.clip(pixels, 0, 255).astype(np.uint8))
    return images, torch.from_numpy(labels).long()


def build_model(seed: int) -> CLIPRCForSemanticSegmentation:
    """CLIP-RC from the random tiny CLIP; a random CLIP has no vocabulary worth using, so each class gets a fixed
    random text embedding."""
    config = CLIPRCConfig(
        crop_size=CROP_SIZE, sliding_window_stride=SLIDING_WINDOW_STRIDE, num_prompt_tokens=4, region_grid_size=2,
        decoder_hidden_size=32, decoder_intermediate_size=64, decoder_num_attention_heads=4, prompt_dropout=0.0,
        decoder_dropout=0.0, decoder_attention_dropout=0.0, setting="fully", id2label=dict(enumerate(CLASS_NAMES)),
    )  # fmt: skip
    clip = build_tiny_clip(replace(QUICKSTART_CLIP, seed=seed)).eval()
    model = CLIPRCForSemanticSegmentation.from_clip(clip, config)
    generator = torch.Generator().manual_seed(seed)
    model.set_class_embeddings(torch.randn(len(CLASS_NAMES), model.config.projection_dim, generator=generator))
    return model


def train(model, image_processor, rng: np.random.Generator, steps: int) -> float:
    """Train on crops normalised by the image processor (no windows: each crop is one model input)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    progress = tqdm(range(steps), desc="training")
    for _ in progress:
        images, labels = quadrant_images(rng, BATCH_SIZE, CROP_SIZE, CROP_SIZE)
        pixel_values = image_processor(images, do_sliding_window=False, return_tensors="pt")["pixel_values"]
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def segment(model, image_processor, images) -> torch.Tensor:
    """The one inference path: processor (windows) -> model -> post-processing."""
    with torch.no_grad():
        outputs = model(**image_processor(images, return_tensors="pt"))
    return torch.stack(image_processor.post_process_semantic_segmentation(outputs))


def save_and_reload(model, image_processor, output_dir: Path):
    """Save the model and its image processor, and load them back through the Auto classes."""
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
    return reloaded, AutoImageProcessor.from_pretrained(output_dir)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; returns 0 when the reloaded model segments exactly as the trained one, else 1."""
    args = _parse_args(argv)
    setup_logging()
    model = build_model(args.seed)
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    rng = np.random.default_rng(args.seed)
    train(model, image_processor, rng, args.steps)

    model.eval()
    images, labels = quadrant_images(rng, NUM_TEST_IMAGES, CROP_SIZE, TEST_IMAGE_WIDTH)
    label_maps = segment(model, image_processor, images)
    accuracy = (label_maps == labels).float().mean().item()
    output_dir = Path(args.output_dir)
    reloaded, reloaded_processor = save_and_reload(model, image_processor, output_dir)
    identical = bool(torch.equal(segment(reloaded, reloaded_processor, images), label_maps))

    logger.info(
        "pixel accuracy on %d new %dx%d images (sliding windows of %d, stride %d): %.3f",
        NUM_TEST_IMAGES, CROP_SIZE, TEST_IMAGE_WIDTH, CROP_SIZE, SLIDING_WINDOW_STRIDE, accuracy,
    )  # fmt: skip
    logger.info("saved to %s; reloaded through the Auto classes, identical label maps: %s", output_dir, identical)
    if not identical:
        logger.error("the reloaded model segments differently")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
