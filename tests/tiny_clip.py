"""A tiny CLIP in the Hub's format (model, tokenizer, image processor) saved by the tests; no download."""

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from .conftest import TINY_TEXT, TINY_VISION
from .tiny_tokenizer import build_tiny_clip_tokenizer


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny `CLIPModel` (2-layer towers, width 32, patch 8, projection 24) with a tiny
    CLIP tokenizer and a CLIP image processor at `directory`, laid out like `openai/clip-vit-base-patch16`."""
    directory = Path(directory)
    tokenizer = build_tiny_clip_tokenizer()
    text_config = dict(
        TINY_TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=dict(TINY_VISION), projection_dim=24))
    clip.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
