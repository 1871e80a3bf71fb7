"""The quickest end-to-end run of the library, offline: tiny CLIP -> CLIP-RC -> train -> segment -> save -> reload.

`python -m clip_rc.toy.quickstart --output_dir outputs/quickstart`
"""

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, CLIPConfig, CLIPModel

from ..configuration_clip_rc import CLIPRCConfig
from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation


logger = logging.getLogger("clip_rc.toy.quickstart")

CLASS_NAMES = ["red square", "green square", "blue square"]
CLASS_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220]], dtype=np.float32)


def tiny_clip(seed: int) -> CLIPModel:
    """A randomly initialised CLIP with 2-layer, 64-wide towers and 16-pixel patches."""
    torch.manual_seed(seed)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 62, "eos_token_id": 63},
        vision_config={**tower, "patch_size": 16, "image_size": 64},
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def quadrant_images(rng: np.random.Generator, count: int, height: int, width: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """RGB images (uint8, `(H, W, 3)`) made of four coloured quadrants, and their class-id maps `(count, H, W)`."""
    cells = rng.integers(0, len(CLASS_NAMES), size=(count, 2, 2))
    labels = cells.repeat(height // 2, 1).repeat(width // 2, 2)
    pixels = CLASS_COLOURS[labels] + rng.normal(0, 25, size=(*labels.shape, 3))
    images = list(np.clip(pixels, 0, 255).astype(np.uint8))
    return images, torch.from_numpy(labels).long()


def build_model(seed: int) -> CLIPRCForSemanticSegmentation:
    """CLIP-RC from the tiny CLIP; a random CLIP has no vocabulary worth using, so each class gets a fixed random
    text embedding."""
    config = CLIPRCConfig(
        crop_size=64, sliding_window_stride=48, num_prompt_tokens=4, region_grid_size=2, decoder_hidden_size=32,
        decoder_intermediate_size=64, decoder_num_attention_heads=4, prompt_dropout=0.0, decoder_dropout=0.0,
        decoder_attention_dropout=0.0, setting="fully", id2label=dict(enumerate(CLASS_NAMES)),
    )  # fmt: skip
    model = CLIPRCForSemanticSegmentation.from_clip(tiny_clip(seed), config)
    generator = torch.Generator().manual_seed(seed)
    model.set_class_embeddings(torch.randn(len(CLASS_NAMES), model.config.projection_dim, generator=generator))
    return model


def train(model, image_processor, rng: np.random.Generator, steps: int) -> float:
    """Train on 64x64 crops normalised by the image processor (no windows: each crop is one model input)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    model.train()
    progress = tqdm(range(steps), desc="training")
    for _ in progress:
        images, labels = quadrant_images(rng, 4, 64, 64)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = build_model(args.seed)
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    rng = np.random.default_rng(args.seed)
    train(model, image_processor, rng, args.steps)

    model.eval()
    images, labels = quadrant_images(rng, 8, 64, 128)
    label_maps = segment(model, image_processor, images)
    accuracy = (label_maps == labels).float().mean().item()

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
    identical = bool(torch.equal(segment(reloaded, AutoImageProcessor.from_pretrained(output_dir), images), label_maps))
    logger.info("pixel accuracy on 8 new 64x128 images (3 sliding windows of 64 each): %.3f", accuracy)
    logger.info("saved to %s; reloaded through the Auto classes, identical label maps: %s", output_dir, identical)
    if not identical:
        logger.error("the reloaded model segments differently")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
