"""A tiny byte-level BPE CLIP tokenizer for tests (no download)."""

from pathlib import Path

from transformers import CLIPTokenizer


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words that become single tokens; anything else is split into byte-level characters.
TINY_WORDS = (
    "a", "photo", "of", "the", "this", "is", "in", "scene", "there", "one", "small", "medium", "large",
    "cat", "dog", "person", "sky", "tree", "road", "grass", "wall", "car", "train", "sofa", "sheep",
)  # fmt: skip


def _bytes_to_unicode() -> list[str]:
    """The printable characters byte-level BPE uses for the 256 byte values (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters, shift = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + shift))
            shift += 1
    return characters


def build_tiny_clip_tokenizer(save_directory: str | Path | None = None) -> CLIPTokenizer:
    """
    Build a CLIP tokenizer with a ~600-token vocabulary: every byte character (alone and word-final with `</w>`),
    the words of `TINY_WORDS` as single tokens, and the start / end-of-text tokens with the two highest ids (as in
    CLIP, where the end-of-text token has the largest id). `model_max_length` is 32.

    Args:
        save_directory (`str` or `Path`, *optional*): if given, the tokenizer is also saved there.
    """
    vocab: dict[str, int] = {}
    for character in _bytes_to_unicode():
        vocab.setdefault(character, len(vocab))
    for character in _bytes_to_unicode():
        vocab.setdefault(character + "</w>", len(vocab))
    merges = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            if merge not in merges:
                merges.append(merge)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)
    if save_directory is not None:
        tokenizer.save_pretrained(str(save_directory))
    return tokenizer
