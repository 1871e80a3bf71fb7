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
"""Tiny CLIPs in the Hub's format, and the one trained here on image-caption pairs of the synthetic world.

The trained tiny CLIP is the stand-in for OpenAI's CLIP when nothing can be downloaded: it knows the names of all the
classes of [`clip_rc.toy.synthetic`] (seen and unseen alike) only from captions, never from masks, as the real CLIP
knows "sheep" from web captions.

- [`clip_tokenizer_from_merges`]: a `CLIPTokenizerFast` (in transformers 5 `CLIPTokenizerFast` is `CLIPTokenizer`,
  the `tokenizers`-backed class) with CLIP's vocabulary layout: the 256 byte characters (plain and word-final, so any
  text encodes), the merged tokens, and the start / end-of-text tokens with the two highest ids.
- [`train_clip_tokenizer`]: the merges learned with the `tokenizers` library from the caption corpus, with CLIP's
  normaliser, pre-tokeniser and `</w>` word-end suffix; every word of the captions is one token.
- [`build_tiny_clip`]: a randomly initialised transformers `CLIPModel` with the small towers of a
  [`TinyCLIPArguments`], whose image tower has the patch size and resolution of the CLIP-RC crop it will serve
  (default 96 px, patch 8: a 12x12 grid). The quickstart and the tests build their random CLIPs with it too.
- [`train_tiny_clip`]: contrastive training with `CLIPModel(..., return_loss=True)` on freshly generated pairs (one
  single-object picture per class and multi-object scenes, captions in varied phrasing; a batch never holds two
  images with the same set of classes, so no caption is a false negative), plus, by default, a dense term
  ([`patch_noun_loss`], GroupViT's multi-label contrastive loss over the caption's nouns, scored on the patch tokens
  as PACL does) that also uses nothing but the image-caption pairs. CLIP's loss alone trains the class token well but
  leaves the patch tokens unaligned with the text (as in OpenAI's CLIP); the dense term is what makes them carry the
  class names. Saved by [`save_clip_folder`] with the tokenizer and a `CLIPImageProcessor` (PIL backend) as a folder
  laid out like `openai/clip-vit-base-patch16`.
- [`save_untrained_clip`]: the control, the same architecture and tokenizer with random weights (never trained on
  captions).
- [`patch_probe`]: the zero-shot premise, measured: per-pixel classification of held-out scenes by the cosine
  similarity between the CLIP's *patch tokens* (last hidden state -> `post_layernorm` -> `visual_projection`) and
  the text embeddings of `"a photo of a {name}"`, scored by [`~clip_rc.metrics.SegmentationMetric`]: accuracy and
  mIoU over seen and over unseen classes.

Images are normalised with ImageNet statistics on 0-255 RGB (the statistics the CLIP-RC pipeline uses, see
`clip_rc.data.REFERENCE_IMAGE_MEAN`), and the saved image processor says so, so the tiny CLIP sees its inputs
exactly as in pre-training wherever it is used.

Command line: `python -m clip_rc.toy.tiny_clip --output_dir outputs/tiny-clip [--quick] [--probe]`.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizerFast,
    get_cosine_schedule_with_warmup,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..data import REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD
from ..metrics import SegmentationMetric
from ..utils import setup_logging, write_json_atomic
from .synthetic import SYNTHETIC_TEMPLATES, SyntheticWorld, WorldConfig, synthetic_benchmark


logger = logging.getLogger("clip_rc.toy.tiny_clip")  # also when run as __main__

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PROBE_SEED",
    "WORD_END",
    "TinyCLIPArguments",
    "build_tiny_clip",
    "caption_corpus",
    "clip_tokenizer_from_merges",
    "image_to_pixel_values",
    "main",
    "patch_embeddings",
    "patch_noun_loss",
    "patch_probe",
    "save_clip_folder",
    "save_untrained_clip",
    "text_embeddings",
    "train_and_probe",
    "train_clip_tokenizer",
    "train_tiny_clip",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
# CLIP's pre-tokeniser: its special tokens, contractions, letter runs, single digits, other symbol runs.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# A CLIP built without a tokenizer gets this many token ids, the last two being start / end of text as in CLIP.
PLACEHOLDER_VOCAB_SIZE = 64

# Prompts of the caption nouns in the dense loss (GroupViT's "prompted nouns").
NOUN_PROMPTS = ("a photo of a {}", "a {}", "a picture of a {}", "there is a {} in the scene", "this is a {}")
# CLIP's Adam settings (Radford et al., 2021) and its cap on the learned logit scale.
ADAM_BETAS = (0.9, 0.98)
ADAM_EPSILON = 1e-6
MAX_LOGIT_SCALE = 100.0

# The tokenizer's corpus: captions per class naming it alone, and the image shares the other captions give their
# classes (below 3 %, between, above 12 %: every size word of the captions appears).
CAPTIONS_PER_CLASS = 10
CORPUS_CLASS_SHARES = (0.01, 0.05, 0.2)

# Seed of the probe's held-out scenes: a stream that no training or dataset seed of the demo draws.
PROBE_SEED = 12345


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def caption_corpus(world: SyntheticWorld | None = None, num_captions: int = 3000, seed: int = 0) -> list[str]:
    """
    Captions of the synthetic world for tokenizer training: every class name in every single-object phrasing and
    `num_captions` captions of random class sets (no image is drawn).
    """
    world = world or SyntheticWorld()
    rng = np.random.default_rng(seed)
    corpus = [template.format(c.name) for c in world.classes for template in SYNTHETIC_TEMPLATES]
    for class_id in range(world.num_classes):
        for _ in range(CAPTIONS_PER_CLASS):
            corpus.append(world.caption(rng, [class_id]))
    for _ in range(num_captions):
        count = int(rng.integers(1, world.config.max_objects + 1))
        class_ids = rng.choice(world.num_classes, size=count, replace=False).tolist()
        shares = {class_id: float(rng.choice(CORPUS_CLASS_SHARES)) for class_id in class_ids}
        corpus.append(world.caption(rng, class_ids, shares=shares))
    corpus.append(world.caption(rng, []))
    return corpus


def clip_tokenizer_from_merges(merges: list[tuple[str, str]], model_max_length: int) -> CLIPTokenizerFast:
    """
    A `CLIPTokenizerFast` with the BPE `merges` (in order) and CLIP's vocabulary layout: the 256 byte characters of
    byte-level BPE in byte order, the same 256 word-final (`</w>`), the merged tokens in the order of `merges`, then
    the start- and end-of-text tokens (the end-of-text token, also used for padding and unknowns, has the highest id).
    """
    byte_to_character = bytes_to_unicode()
    characters = [byte_to_character[byte] for byte in range(256)]
    vocab: dict[str, int] = {}
    for token in characters + [character + WORD_END for character in characters]:
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)


def train_clip_tokenizer(
    captions: list[str],
    vocab_size: int = 2048,
    model_max_length: int = 32,
    save_directory: str | os.PathLike | None = None,
) -> CLIPTokenizerFast:
    """
    Train a CLIP byte-level BPE tokenizer on `captions` with the `tokenizers` library and wrap it as a
    `CLIPTokenizerFast` (see [`clip_tokenizer_from_merges`]).

    The BPE model is trained with CLIP's own normaliser (NFC, whitespace collapse, lower-case) and pre-tokeniser
    (CLIP's split regex, then byte-level), `</w>` as the end-of-word suffix and the byte alphabet as initial
    alphabet; merges stop when every caption word is one token or at `vocab_size`.

    Args:
        captions (`list[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to 2048): upper bound of the vocabulary size.
        model_max_length (`int`, *optional*, defaults to 32): the tokenizer's maximum length (and the text tower's
            number of positions).
        save_directory (`str` or `os.PathLike`, *optional*): where to save the tokenizer as well.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=WORD_END))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=WORD_END,
        continuing_subword_prefix="",
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    tokenizer = clip_tokenizer_from_merges(merges, model_max_length)
    if save_directory is not None:
        tokenizer.save_pretrained(os.fspath(save_directory))
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TinyCLIPArguments:
    """
    Architecture and training recipe of a tiny CLIP.

    The image tower must match the CLIP-RC crop it will serve: `image_size` = CLIP-RC `crop_size` (or the position
    table is resized) and `patch_size` = the patch size CLIP-RC expects. The feed-forward layers are `mlp_ratio` times
    as wide as their tower (4, as in CLIP). `seed` seeds the weights, the pairs and the prompts.

    The defaults (3-layer 64-wide image tower with 8-pixel patches on 96-pixel images, 2-layer 64-wide text tower,
    64-dimensional joint space; 700 steps of 32 pairs with AdamW, linear warm-up over `warmup_fraction` of the steps,
    then cosine decay) take about 80 seconds on 2 idle CPU cores. `num_threads` torch threads are used while training
    (1 by default: the batches are rendered in a data-loader worker process, and on a shared 2-core machine one
    torch thread is faster than two); `None` keeps torch's setting.
    """

    image_size: int = 96
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 64
    max_text_length: int = 32
    # 450 steps left some seeds' CLIPs short of the class names (seed 4: its patch tokens labelled "button" pixels at
    # 48 IoU, and CLIP-RC gave them to the unseen "tile"); 700 steps brought that probe to 76.
    steps: int = 700
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    single_object_fraction: float = 0.5
    single_object_size: tuple[float, float] = (0.25, 0.6)
    dense_loss_weight: float = 2.0
    dense_temperature: float = 0.2
    seed: int = 0
    log_every: int = 50
    num_threads: int | None = 1

    @classmethod
    def quick(cls, **overrides) -> "TinyCLIPArguments":
        """The recipe of `--quick` runs and tests: 80 steps instead of 700."""
        values = {"steps": 80}
        values.update(overrides)
        return cls(**values)


def build_tiny_clip(args: TinyCLIPArguments, tokenizer: CLIPTokenizerFast | None = None) -> CLIPModel:
    """
    A `CLIPModel` with the tiny towers of `args`, randomly initialised with seed `args.seed`. The text tower takes the
    vocabulary and special tokens of `tokenizer`; without one (a CLIP whose text tower is never given text), a
    vocabulary of [`PLACEHOLDER_VOCAB_SIZE`] ids whose last two are start and end of text, as in CLIP.
    """
    if tokenizer is None:
        vocabulary = {"vocab_size": PLACEHOLDER_VOCAB_SIZE, "bos_token_id": PLACEHOLDER_VOCAB_SIZE - 2}
        vocabulary["eos_token_id"] = vocabulary["pad_token_id"] = PLACEHOLDER_VOCAB_SIZE - 1
    else:
        vocabulary = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    text_config = {
        **vocabulary,
        "hidden_size": args.text_hidden_size,
        "intermediate_size": args.mlp_ratio * args.text_hidden_size,
        "num_hidden_layers": args.text_layers,
        "num_attention_heads": args.text_heads,
        "max_position_embeddings": args.max_text_length,
    }
    vision_config = {
        "hidden_size": args.vision_hidden_size,
        "intermediate_size": args.mlp_ratio * args.vision_hidden_size,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": args.vision_heads,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
    }
    torch.manual_seed(args.seed)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)
    return CLIPModel(config)


def image_to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """`(B, H, W, 3)` uint8 RGB -> `(B, 3, H, W)` float, normalised with ImageNet statistics on 0-255 (as CLIP-RC)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(REFERENCE_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(REFERENCE_IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def patch_embeddings(clip: CLIPModel, pixel_values: torch.Tensor, vision_outputs=None) -> torch.Tensor:
    """L2-normalised patch tokens in the joint space: last hidden state (class token dropped) -> `post_layernorm`
    -> `visual_projection`. Shape `(B, N, E)`."""
    if vision_outputs is None:
        vision_outputs = clip.vision_model(pixel_values=pixel_values)
    tokens = clip.vision_model.post_layernorm(vision_outputs.last_hidden_state[:, 1:])
    return F.normalize(clip.visual_projection(tokens), dim=-1)


@torch.no_grad()
def text_embeddings(clip: CLIPModel, tokenizer, class_names, templates=SYNTHETIC_TEMPLATES) -> torch.Tensor:
    """L2-normalised class embeddings `(C, E)`: the renormalised mean over `templates` of the prompt embeddings."""
    prompts = [template.format(name) for name in class_names for template in templates]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    text_outputs = clip.text_model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    embeds = F.normalize(clip.text_projection(text_outputs.pooler_output), dim=-1)
    embeds = embeds.view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(embeds, dim=-1)


def save_clip_folder(
    output_dir: str | os.PathLike,
    clip: CLIPModel,
    tokenizer: CLIPTokenizerFast,
    args: TinyCLIPArguments,
    extra: dict | None = None,
) -> Path:
    """
    Save a CLIP folder in the Hub's format (as `openai/clip-vit-base-patch16`): `config.json` + weights, the tokenizer
    files, `preprocessor_config.json` (a `CLIPImageProcessor`, PIL backend, with this CLIP's resolution and ImageNet
    statistics), and `tiny_clip_args.json` recording the recipe (and `extra`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": args.image_size},
        crop_size={"height": args.image_size, "width": args.image_size},
        image_mean=[m / 255 for m in REFERENCE_IMAGE_MEAN],
        image_std=[s / 255 for s in REFERENCE_IMAGE_STD],
    ).save_pretrained(output_dir)
    write_json_atomic(output_dir / "tiny_clip_args.json", {**asdict(args), **(extra or {})})
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def patch_noun_loss(
    patch_embeds: torch.Tensor,
    noun_embeds: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """
    Dense multi-label image-noun contrastive loss, weakly supervised by the captions only.

    As GroupViT's multi-label contrastive loss (Xu et al., CVPR 2022), each caption contributes its nouns, each
    prompted as a short text ("a photo of a {noun}"); as PACL (Mukhoti et al., CVPR 2023), the score of an image and a
    noun pools the similarities of the image's patches to the noun with softmax weights (temperature `temperature`),
    so a noun is matched by the patches that show it. The loss is the symmetric multi-positive cross-entropy of
    GroupViT: every image against the batch's nouns (positives: the nouns of its caption) and every noun against the
    batch's images (positives: the images whose caption names it).

    Args:
        patch_embeds: `(B, N, E)` normalised patch embeddings.
        noun_embeds: `(K, E)` normalised embeddings of the batch's distinct nouns.
        targets: `(B, K)` 0/1, 1 where image b's caption names noun k.
        logit_scale: CLIP's (log) logit scale; its exponential multiplies the pooled scores.
    """
    similarity = torch.einsum("bne,ke->bkn", patch_embeds, noun_embeds)  # (images, nouns, patches)
    weights = torch.softmax(similarity / temperature, dim=-1)
    scores = (weights * similarity).sum(-1) * logit_scale.exp()  # (images, nouns)
    targets = targets.to(scores.dtype)

    def multi_positive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        rows = positives.sum(-1) > 0
        log_probs = torch.log_softmax(logits[rows], dim=-1)
        positives = positives[rows]
        return -((log_probs * positives).sum(-1) / positives.sum(-1)).mean()

    return 0.5 * (multi_positive(scores, targets) + multi_positive(scores.t(), targets.t()))


class _PairBatches(torch.utils.data.IterableDataset):
    """
    `count` fresh image-caption batches of the world, in one seeded stream (seed `args.seed`): single-object pictures
    and multi-object scenes, with no two images of a batch naming the same set of classes. Yields `(pixel_values,
    captions)`; a `DataLoader` with one worker renders them in a process of its own while the model trains, and the
    stream is the same as when they are drawn in the loop.
    """

    def __init__(self, world: SyntheticWorld, args: TinyCLIPArguments, count: int):
        self.world, self.args, self.count = world, args, count

    def __iter__(self):
        rng = np.random.default_rng(self.args.seed)
        for _ in range(self.count):
            images, captions = self._batch(rng)
            yield image_to_pixel_values(images), captions

    def _batch(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        world, args = self.world, self.args
        images, captions, seen_sets = [], [], set()
        num_single = int(round(args.single_object_fraction * args.batch_size))
        singles = list(rng.permutation(world.num_classes))
        attempts = 0
        while len(images) < args.batch_size and attempts < 20 * args.batch_size:
            attempts += 1
            if len(images) < num_single and singles:
                class_ids = [int(singles.pop())]
                scene = world.sample_scene(rng, class_ids, size_range=args.single_object_size)
            else:
                scene = world.sample_scene(rng)
            image, label = world.render(scene)
            visible = tuple(world.visible_classes(label))
            if visible in seen_sets:
                continue
            seen_sets.add(visible)
            if rng.random() < 0.5:
                image = image[:, ::-1]
            images.append(image)
            captions.append(world.caption(rng, visible, label))
        return np.stack(images), captions


def _world(args: TinyCLIPArguments, world_config: WorldConfig | None) -> SyntheticWorld:
    world_config = world_config or WorldConfig(image_size=args.image_size)
    if world_config.image_size != args.image_size:
        raise ValueError(f"World images of {world_config.image_size} px for a CLIP of {args.image_size} px.")
    return SyntheticWorld(world_config)


def _caption_tokenizer(world: SyntheticWorld, args: TinyCLIPArguments) -> CLIPTokenizerFast:
    """The tokenizer trained on the world's caption corpus (seed `args.seed + 1`)."""
    return train_clip_tokenizer(caption_corpus(world, seed=args.seed + 1), model_max_length=args.max_text_length)


def _optimizer(clip: CLIPModel, args: TinyCLIPArguments) -> torch.optim.AdamW:
    """AdamW with CLIP's settings; no weight decay on gains, biases, embeddings and the logit scale."""
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPSILON,
    )


def _dense_loss(clip, tokenizer, captions, vision_outputs, class_words, prompt_rng, temperature) -> torch.Tensor:
    """[`patch_noun_loss`] of a batch: the captions' nouns (their words that are class names), each in a random
    prompt of [`NOUN_PROMPTS`], against the patch tokens; zero when no caption names a class."""
    nouns = [[word for word in caption.split() if word in class_words] for caption in captions]
    vocabulary = sorted({noun for caption_nouns in nouns for noun in caption_nouns})
    if not vocabulary:
        return torch.zeros(())
    targets = torch.tensor([[float(noun in caption_nouns) for noun in vocabulary] for caption_nouns in nouns])
    prompts = [str(prompt_rng.choice(NOUN_PROMPTS)).format(noun) for noun in vocabulary]
    noun_text = tokenizer(prompts, padding=True, return_tensors="pt")
    noun_embeds = F.normalize(clip.text_projection(clip.text_model(**noun_text).pooler_output), dim=-1)
    patches = patch_embeddings(clip, None, vision_outputs)
    return patch_noun_loss(patches, noun_embeds, targets, clip.logit_scale, temperature)


class _TinyCLIPTrainer:
    """One optimisation step at a time: CLIP's contrastive loss plus the weighted dense loss, AdamW, gradient
    clipping, the warm-up + cosine schedule, and CLIP's cap on the logit scale."""

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizerFast, world: SyntheticWorld, args: TinyCLIPArguments):
        self.clip, self.tokenizer, self.args = clip, tokenizer, args
        self.class_words = {synthetic_class.name for synthetic_class in world.classes}
        self.prompt_rng = np.random.default_rng(args.seed + 1)
        self.optimizer = _optimizer(clip, args)
        warmup_steps = int(args.warmup_fraction * args.steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, args.steps)

    def step(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[float, float]:
        """Train on one batch; returns its `(contrastive, dense)` losses."""
        clip, args = self.clip, self.args
        text = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        outputs = clip(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=pixel_values,
            return_loss=True,
        )
        loss, dense = outputs.loss, torch.zeros(())
        if args.dense_loss_weight > 0:
            dense = _dense_loss(
                clip, self.tokenizer, captions, outputs.vision_model_output, self.class_words, self.prompt_rng,
                args.dense_temperature,
            )  # fmt: skip
            loss = loss + args.dense_loss_weight * dense
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return outputs.loss.item(), dense.item()


def _train_loop(trainer: _TinyCLIPTrainer, batches: torch.utils.data.DataLoader, show_progress: bool):
    args = trainer.args
    start = time.perf_counter()
    progress = tqdm(batches, total=args.steps, desc="tiny CLIP", disable=not show_progress)
    running = None
    for step, (pixel_values, captions) in enumerate(progress):
        losses = trainer.step(pixel_values, captions)
        running = losses if running is None else tuple(0.9 * r + 0.1 * v for r, v in zip(running, losses))
        progress.set_postfix(clip=f"{running[0]:.3f}", dense=f"{running[1]:.3f}")
        if args.log_every and (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - start
            logger.info(
                "tiny CLIP step %d/%d: contrastive loss %.3f, dense %.3f, %.0f s elapsed, ETA %.0f s",
                step + 1, args.steps, running[0], running[1], elapsed, elapsed / (step + 1) * (args.steps - step - 1),
            )  # fmt: skip
    logger.info(
        "tiny CLIP trained in %.1f s (%d steps of %d pairs)", time.perf_counter() - start, args.steps, args.batch_size
    )


def train_tiny_clip(
    output_dir: str | os.PathLike | None = None,
    args: TinyCLIPArguments | None = None,
    world_config: WorldConfig | None = None,
    tokenizer: CLIPTokenizerFast | None = None,
    show_progress: bool = True,
) -> tuple[CLIPModel, CLIPTokenizerFast]:
    """
    Train the tiny CLIP on image-caption pairs of the synthetic world (all classes, no masks) and, if `output_dir`
    is given, save it there in the Hub's format (see [`save_clip_folder`]).

    Each step draws a fresh batch (rendered ahead by a `DataLoader` worker), and minimises `CLIPModel`'s own
    contrastive loss (`return_loss=True`) plus `dense_loss_weight` times [`patch_noun_loss`] (the caption's nouns,
    i.e. the words of the captions that are class names, each in a random short prompt of [`NOUN_PROMPTS`], grounded
    in the patch tokens), with AdamW and transformers' `get_cosine_schedule_with_warmup`. No label map is used. The
    result depends on `args.seed` only.

    Returns:
        `(CLIPModel, CLIPTokenizerFast)`: the trained model (eval mode) and its tokenizer.
    """
    args = args or TinyCLIPArguments()
    world = _world(args, world_config)
    if tokenizer is None:
        tokenizer = _caption_tokenizer(world, args)
    clip = build_tiny_clip(args, tokenizer).train()
    trainer = _TinyCLIPTrainer(clip, tokenizer, world, args)
    # The worker's own torch seed is drawn from this generator, not from the global one the caller may rely on.
    batches = torch.utils.data.DataLoader(
        _PairBatches(world, args, args.steps), batch_size=None, num_workers=1, generator=torch.Generator()
    )
    previous_threads = torch.get_num_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        _train_loop(trainer, batches, show_progress)
    finally:
        torch.set_num_threads(previous_threads)
    clip.eval()
    if output_dir is not None:
        save_clip_folder(output_dir, clip, tokenizer, args, extra={"trained_on_captions": True})
    return clip, tokenizer


def save_untrained_clip(
    output_dir: str | os.PathLike,
    args: TinyCLIPArguments | None = None,
    tokenizer: CLIPTokenizerFast | None = None,
    world_config: WorldConfig | None = None,
) -> Path:
    """The control CLIP: same architecture, tokenizer and folder layout as [`train_tiny_clip`], random weights (seed
    `args.seed`), never trained on captions."""
    args = args or TinyCLIPArguments()
    if tokenizer is None:
        tokenizer = _caption_tokenizer(_world(args, world_config), args)
    clip = build_tiny_clip(args, tokenizer).eval()
    return save_clip_folder(output_dir, clip, tokenizer, args, extra={"trained_on_captions": False})


# ----------------------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_probe(
    clip: CLIPModel | str | os.PathLike,
    tokenizer=None,
    num_images: int = 200,
    seed: int = PROBE_SEED,
    world_config: WorldConfig | None = None,
    batch_size: int = 50,
) -> dict[str, float]:
    """
    Zero-shot dense classification by the CLIP's patch tokens, without any segmentation training.

    Held-out scenes of the world (seed `seed`) go through the image tower; every patch embedding (see
    [`patch_embeddings`]) is compared by cosine similarity to the text embeddings of `"a photo of a {name}"` of all
    12 classes; the similarity maps are upsampled bilinearly to the image and each labelled pixel takes the most
    similar class. Chance is 1/12.

    Returns:
        `dict`: `pixel_accuracy`, `seen_pixel_accuracy`, `unseen_pixel_accuracy` (accuracy over the pixels of seen /
        unseen classes), `mIoU`, `seen_mIoU`, `unseen_mIoU` (IoU over labelled pixels), `per_class_IoU` (all in %)
        and `num_pixels`, from a [`~clip_rc.metrics.SegmentationMetric`].
    """
    if not isinstance(clip, CLIPModel):
        from transformers import AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(clip)
        clip = CLIPModel.from_pretrained(clip)
    clip.eval()
    benchmark = synthetic_benchmark()
    image_size = clip.config.vision_config.image_size
    world = SyntheticWorld(world_config or WorldConfig(image_size=image_size))
    text = text_embeddings(clip, tokenizer, benchmark.class_names, benchmark.templates)
    metric = SegmentationMetric(
        benchmark.num_classes, benchmark.ignore_index, benchmark.seen_class_ids, benchmark.class_names
    )
    samples = list(world.generate(num_images, seed=seed))
    for start in range(0, num_images, batch_size):
        chunk = samples[start : start + batch_size]
        images = np.stack([sample[0] for sample in chunk])
        metric.update(_nearest_class_maps(clip, text, images), np.stack([sample[1] for sample in chunk]))
    return _probe_figures(metric)


def _nearest_class_maps(clip: CLIPModel, text: torch.Tensor, images: np.ndarray) -> torch.Tensor:
    """`(B, H, W)` class ids: per pixel, the class whose text embedding is the most similar to the patch tokens
    (the similarity maps upsampled bilinearly to the image)."""
    vision_config = clip.config.vision_config
    grid = vision_config.image_size // vision_config.patch_size
    patches = patch_embeddings(clip, image_to_pixel_values(images))  # (B, N, E)
    similarity = torch.einsum("bne,ce->bcn", patches, text).reshape(len(images), len(text), grid, grid)
    similarity = F.interpolate(similarity, size=images.shape[1:3], mode="bilinear", align_corners=False)
    return similarity.argmax(1)


def _probe_figures(metric: SegmentationMetric) -> dict[str, float]:
    results = metric.compute(sync=False)
    correct, labelled = metric.total_area_intersect.double(), metric.total_area_label.double()

    def accuracy(class_ids: list[int]) -> float:
        return float(100 * correct[class_ids].sum() / max(labelled[class_ids].sum(), 1))

    return {
        "pixel_accuracy": accuracy(list(range(metric.num_labels))),
        "seen_pixel_accuracy": accuracy(metric.seen_class_ids),
        "unseen_pixel_accuracy": accuracy(metric.unseen_class_ids),
        "mIoU": 100 * results["mean_iou"],
        "seen_mIoU": 100 * results["mean_iou_seen"],
        "unseen_mIoU": 100 * results["mean_iou_unseen"],
        "per_class_IoU": {
            name: round(float(100 * iou), 2) for name, iou in zip(metric.class_names, results["per_category_iou"])
        },
        "num_pixels": int(labelled.sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TinyCLIPArguments]:
    parser = argparse.ArgumentParser(description="Train a tiny CLIP on the synthetic world's image-caption pairs.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--quick", action="store_true", help="the short recipe used by the tests")
    parser.add_argument("--control_dir", default=None, help="also save the caption-untrained control CLIP here")
    parser.add_argument("--probe", action="store_true", help="run the patch-token probe on the result(s)")
    numeric = [arg_field for arg_field in fields(TinyCLIPArguments) if arg_field.type in (int, float, "int", "float")]
    for arg_field in numeric:
        parser.add_argument(f"--{arg_field.name}", type=type(arg_field.default), default=None)
    namespace = parser.parse_args(argv)
    overrides = {f.name: getattr(namespace, f.name) for f in numeric if getattr(namespace, f.name) is not None}
    args = TinyCLIPArguments.quick(**overrides) if namespace.quick else TinyCLIPArguments(**overrides)
    return namespace, args


def train_and_probe(argv: list[str] | None = None) -> dict:
    """Train the tiny CLIP (and optionally the untrained control) and probe them; returns the probe results."""
    namespace, args = _parse_args(argv)
    setup_logging()
    clip, tokenizer = train_tiny_clip(namespace.output_dir, args)
    results = {}
    if namespace.probe:
        results["trained"] = patch_probe(clip, tokenizer)
        logger.info("patch probe, trained CLIP: %s", json.dumps(results["trained"]))
    if namespace.control_dir:
        save_untrained_clip(namespace.control_dir, args, tokenizer)
        if namespace.probe:
            results["control"] = patch_probe(namespace.control_dir)
            logger.info("patch probe, control CLIP: %s", json.dumps(results["control"]))
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m clip_rc.toy.tiny_clip`: see [`train_and_probe`]; returns the exit status, 0 on success."""
    train_and_probe(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
