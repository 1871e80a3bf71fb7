"""The quickest end-to-end run of the library, offline: tiny CLIP -> CLIP-RC -> train -> segment -> save -> reload.

`python -m clip_rc.quickstart --output_dir outputs/quickstart`
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSemanticSegmentation, CLIPConfig, CLIPModel

from .configuration_clip_rc import CLIPRCConfig
from .modeling_clip_rc import CLIPRCForSemanticSegmentation


logger = logging.getLogger("clip_rc.quickstart")

CLASS_NAMES = ["red square", "green square", "blue square"]
CLASS_COLOURS = np.array([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]], dtype=np.float32)


def tiny_clip(seed: int) -> CLIPModel:
    """A randomly initialised CLIP with 2-layer, 64-wide towers and 16-pixel patches."""
    torch.manual_seed(seed)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 63},
        vision_config={**tower, "patch_size": 16, "image_size": 64},
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def quadrant_batch(rng: np.random.Generator, batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images made of four coloured quadrants and their class-id maps."""
    labels = rng.integers(0, len(CLASS_NAMES), size=(batch_size, 2, 2)).repeat(size // 2, 1).repeat(size // 2, 2)
    pixels = CLASS_COLOURS[labels] + rng.normal(0, 0.3, size=(*labels.shape, 3)).astype(np.float32)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    clip = tiny_clip(args.seed)
    config = CLIPRCConfig(
        crop_size=64,
        sliding_window_stride=48,
        num_prompt_tokens=4,
        region_grid_size=2,
        decoder_hidden_size=32,
        decoder_intermediate_size=64,
        decoder_num_attention_heads=4,
        prompt_dropout=0.0,
        decoder_dropout=0.0,
        decoder_attention_dropout=0.0,
        setting="fully",
        id2label=dict(enumerate(CLASS_NAMES)),
    )
    model = CLIPRCForSemanticSegmentation.from_clip(clip, config)
    # A tiny random CLIP has no vocabulary worth using: give each class a fixed random text embedding.
    generator = torch.Generator().manual_seed(args.seed)
    model.set_class_embeddings(torch.randn(len(CLASS_NAMES), model.config.projection_dim, generator=generator))

    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    model.train()
    progress = tqdm(range(args.steps), desc="training")
    for _ in progress:
        pixel_values, labels = quadrant_batch(rng, 4, 64)
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    pixel_values, labels = quadrant_batch(rng, 8, 96)
    label_maps = torch.stack(model.segment(pixel_values))
    accuracy = (label_maps == labels).float().mean().item()

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
    identical = bool(torch.equal(torch.stack(reloaded.segment(pixel_values)), label_maps))
    logger.info("pixel accuracy on 8 new 96x96 images (sliding windows of 64): %.3f", accuracy)
    logger.info("saved to %s; reloaded through AutoModelForSemanticSegmentation, identical label maps: %s", output_dir, identical)
    if not identical:
        raise SystemExit("the reloaded model segments differently")
    return {"pixel_accuracy": accuracy, "final_loss": loss.item()}


if __name__ == "__main__":
    main()
