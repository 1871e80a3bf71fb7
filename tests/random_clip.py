"""The tests' CLIP: a tiny, randomly initialised `CLIPModel` with a small CLIP tokenizer, saved in the Hub's format
(no download). Built with the library's own tiny-CLIP functions ([`clip_rc.toy.tiny_clip`])."""

from dataclasses import replace
from pathlib import Path

from transformers import CLIPTokenizer

from clip_rc.toy.tiny_clip import (
    WORD_END,
    TinyCLIPArguments,
    build_tiny_clip,
    clip_tokenizer_from_merges,
    save_clip_folder,
)

from .conftest import TINY_TEXT, TINY_VISION


# Words that become single tokens; anything else is split into byte-level characters.
TEST_WORDS = (
    "a", "photo", "of", "the", "this", "is", "in", "scene", "there", "one", "small", "medium", "large",
    "cat", "dog", "person", "sky", "tree", "road", "grass", "wall", "car", "train", "sofa", "sheep",
)  # fmt: skip
TEST_TOKENIZER_MAX_LENGTH = 32

# The towers of TINY_VISION / TINY_TEXT (2 layers, width 32, 4 heads, patch 8 on 32 px), a 24-dimensional joint space
# and the test tokenizer's length.
RANDOM_CLIP = TinyCLIPArguments(
    image_size=TINY_VISION["image_size"],
    patch_size=TINY_VISION["patch_size"],
    vision_hidden_size=TINY_VISION["hidden_size"],
    vision_layers=TINY_VISION["num_hidden_layers"],
    vision_heads=TINY_VISION["num_attention_heads"],
    text_hidden_size=TINY_TEXT["hidden_size"],
    text_layers=TINY_TEXT["num_hidden_layers"],
    text_heads=TINY_TEXT["num_attention_heads"],
    mlp_ratio=TINY_VISION["intermediate_size"] // TINY_VISION["hidden_size"],
    projection_dim=24,
    max_text_length=TEST_TOKENIZER_MAX_LENGTH,
)


def build_test_tokenizer(save_directory: str | Path | None = None) -> CLIPTokenizer:
    """
    A CLIP tokenizer with a ~600-token vocabulary: every byte character (alone and word-final), the words of
    `TEST_WORDS` as single tokens, and the start / end-of-text tokens with the two highest ids (see
    [`clip_tokenizer_from_merges`]). `model_max_length` is 32.

    Args:
        save_directory (`str` or `Path`, *optional*): if given, the tokenizer is also saved there.
    """
    merges = []
    for word in TEST_WORDS:
        pieces = list(word[:-1]) + [word[-1] + WORD_END]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
    tokenizer = clip_tokenizer_from_merges(merges, model_max_length=TEST_TOKENIZER_MAX_LENGTH)
    if save_directory is not None:
        tokenizer.save_pretrained(str(save_directory))
    return tokenizer


def save_random_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny `CLIPModel` ([`RANDOM_CLIP`], seed `seed`) with the test tokenizer and a CLIP
    image processor at `directory`, laid out like `openai/clip-vit-base-patch16`."""
    tokenizer = build_test_tokenizer()
    args = replace(RANDOM_CLIP, seed=seed)
    clip = build_tiny_clip(args, tokenizer)
    return save_clip_folder(directory, clip, tokenizer, args, extra={"trained_on_captions": False})
