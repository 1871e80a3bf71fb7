"""Shared fixtures: tiny CLIP-RC configurations and models built in the test process (no downloads)."""

import pytest
import torch

from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation

from .transformers_suites import SUITE_MARKERS


TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
    "image_size": 32,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
    "max_position_embeddings": 16,
    "bos_token_id": 62,
    "eos_token_id": 63,
    "pad_token_id": 63,
}


def pytest_configure(config):
    """Register the markers of transformers' common suites (their own conftest does it upstream)."""
    for marker in SUITE_MARKERS:
        config.addinivalue_line("markers", f"{marker}: a marker of transformers' common test suites")


def tiny_config(**overrides) -> CLIPRCConfig:
    """A CLIP-RC config small enough for CPU tests: crop 64, patch 8 (8x8 grid), 2x2 regions, 3 classes."""
    values = {
        "vision_config": dict(TINY_VISION),
        "text_config": dict(TINY_TEXT),
        "projection_dim": 24,
        "crop_size": 64,
        "sliding_window_stride": 48,
        "num_prompt_tokens": 3,
        "region_grid_size": 2,
        "decoder_hidden_size": 24,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 48,
        "id2label": {0: "cat", 1: "dog", 2: "grass"},
        "seen_class_ids": [0, 1],
    }
    values.update(overrides)
    return CLIPRCConfig(**values)


def without_dropout(**overrides) -> CLIPRCConfig:
    return tiny_config(prompt_dropout=0.0, decoder_dropout=0.0, decoder_attention_dropout=0.0, **overrides)


def tiny_model(config: CLIPRCConfig | None = None, seed: int = 0) -> CLIPRCForSemanticSegmentation:
    """A randomly initialised tiny model whose persisted class embeddings are set."""
    torch.manual_seed(seed)
    config = config or tiny_config()
    model = CLIPRCForSemanticSegmentation(config)
    model.set_class_embeddings(torch.randn(config.num_labels, config.projection_dim))
    return model


@pytest.fixture
def model() -> CLIPRCForSemanticSegmentation:
    return tiny_model()
