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
"""A tiny CLIP trained here, on image-caption pairs of the synthetic world, saved in the Hub's format.

This is the stand-in for OpenAI's CLIP when nothing can be downloaded: it knows the names of all the classes of
[`clip_rc.toy.synthetic`] (seen and unseen alike) only from captions, never from masks, as the real CLIP knows "sheep"
from web captions.

- [`train_clip_tokenizer`]: a byte-level BPE trained with the `tokenizers` library on the caption corpus, with
  CLIP's normaliser, pre-tokeniser and `</w>` word-end suffix, wrapped as a `CLIPTokenizerFast` (in transformers 5
  `CLIPTokenizerFast` is `CLIPTokenizer`, the `tokenizers`-backed class). Every word of the captions is one token;
  all 256 byte characters (plain and word-final) are in the vocabulary, so any text encodes; the start / end-of-text
  tokens have the two highest ids, as in CLIP.
- [`build_tiny_clip`]: a transformers `CLIPModel` with small towers whose image tower has the patch size and
  resolution of the CLIP-RC crop it will serve (default 96 px, patch 8: a 12x12 grid).
- [`train_tiny_clip`]: contrastive training with `CLIPModel(..., return_loss=True)` on freshly generated pairs (one
  single-object picture per class and multi-object scenes, captions in varied phrasing; a batch never holds two
  images with the same set of classes, so no caption is a false negative), plus, by default, a dense term
  ([`patch_noun_loss`], GroupViT's multi-label contrastive loss over the caption's nouns, scored on the patch tokens
  as PACL does) that also uses nothing but the image-caption pairs. CLIP's loss alone trains the class token well but
  leaves the patch tokens unaligned with the text (as in OpenAI's CLIP); the dense term is what makes them carry the
  class names. Saved with the tokenizer and a `CLIPImageProcessor` (PIL backend) as a folder laid out like
  `openai/clip-vit-base-patch16`.
- [`save_untrained_clip`]: the control, the same architecture and tokenizer with random weights (never trained on
  captions).
- [`patch_probe`]: the zero-shot premise, measured: per-pixel classification of held-out scenes by the cosine
  similarity between the CLIP's *patch tokens* (last hidden state -> `post_layernorm` -> `visual_projection`) and
  the text embeddings of `"a photo of a {name}"`; accuracy and mIoU over seen and over unseen classes.

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
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizerFast

from ..data import REFERENCE_IMAGE_MEAN, REFERENCE_IMAGE_STD
from .synthetic import SYNTHETIC_TEMPLATES, SyntheticWorld, WorldConfig, synthetic_benchmark


logger = logging.getLogger("clip_rc.toy.tiny_clip")  # also when run as __main__

__all__ = [
    "TinyCLIPArguments",
    "build_tiny_clip",
    "caption_corpus",
    "image_to_pixel_values",
    "main",
    "patch_noun_loss",
    "patch_embeddings",
    "patch_probe",
    "save_clip_folder",
    "save_untrained_clip",
    "text_embeddings",
    "train_and_probe",
    "train_clip_tokenizer",
    "train_tiny_clip",
]

# Prompts of the caption nouns in the dense loss (GroupViT's "prompted nouns").
NOUN_PROMPTS = ("a photo of a {}", "a {}", "a picture of a {}", "there is a {} in the scene", "this is a {}")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


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
        for _ in range(10):
            corpus.append(world.caption(rng, [class_id]))
    for _ in range(num_captions):
        count = int(rng.integers(1, world.config.max_objects + 1))
        class_ids = rng.choice(world.num_classes, size=count, replace=False).tolist()
        shares = {class_id: float(rng.choice([0.01, 0.05, 0.2])) for class_id in class_ids}
        corpus.append(world.caption(rng, class_ids, shares=shares))
    corpus.append(world.caption(rng, []))
    return corpus


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the byte values (GPT-2 / CLIP convention)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return sorted(alphabet, key=lambda character: _byte_of(character))


def _byte_of(character: str) -> int:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + shift)] = byte
            shift += 1
    return mapping[character]


def train_clip_tokenizer(
    captions: list[str], vocab_size: int = 2048, model_max_length: int = 32, save_directory: str | os.PathLike | None = None
) -> CLIPTokenizerFast:
    """
    Train a CLIP byte-level BPE tokenizer on `captions` with the `tokenizers` library and wrap it as a
    `CLIPTokenizerFast`.

    The BPE model is trained with CLIP's own normaliser (NFC, whitespace collapse, lower-case) and pre-tokeniser
    (CLIP's split regex, then byte-level), `</w>` as the end-of-word suffix and the byte alphabet as initial
    alphabet; merges stop when every caption word is one token or at `vocab_size`. The vocabulary is then laid out as
    CLIP's: the 256 byte characters, the 256 word-final byte characters, the learned merges in order, and the
    start- / end-of-text tokens last (the end-of-text token, also used for padding and unknowns, has the highest id).

    Args:
        captions (`list[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to 2048): upper bound of the vocabulary size.
        model_max_length (`int`, *optional*, defaults to 32): the tokenizer's maximum length (and the text tower's
            number of positions).
        save_directory (`str` or `os.PathLike`, *optional*): where to save the tokenizer as well.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
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
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]

    characters = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if save_directory is not None:
        tokenizer.save_pretrained(os.fspath(save_directory))
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TinyCLIPArguments:
    """
    Architecture and training recipe of the tiny CLIP.

    The image tower must match the CLIP-RC crop it will serve: `image_size` = CLIP-RC `crop_size` (or the position
    table is resized) and `patch_size` = the patch size CLIP-RC expects.

    The defaults (3-layer 64-wide image tower with 8-pixel patches on 96-pixel images, 2-layer 64-wide text tower,
    64-dimensional joint space; 450 steps of 32 pairs) take about 3 minutes on 2 busy CPU cores. `num_threads`
    torch threads are used while training (1 by default: the batches are rendered in a second thread, and on a
    shared 2-core machine one torch thread is faster than two); `None` keeps torch's setting.
    """

    image_size: int = 96
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64
    max_text_length: int = 32
    steps: int = 450
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    single_object_fraction: float = 0.5
    single_object_size: tuple[float, float] = (0.25, 0.6)
    dense_loss_weight: float = 2.0
    dense_temperature: float = 0.2
    seed: int = 0
    log_every: int = 50
    num_threads: int | None = 1

    @classmethod
    def quick(cls, **overrides) -> "TinyCLIPArguments":
        """The recipe of `--quick` runs and tests: 80 steps instead of 450 (about half a minute on 2 CPU cores)."""
        values = {"steps": 80}
        values.update(overrides)
        return cls(**values)


def build_tiny_clip(tokenizer: CLIPTokenizerFast, args: TinyCLIPArguments) -> CLIPModel:
    """A randomly initialised `CLIPModel` with the tiny towers of `args` and the vocabulary of `tokenizer`."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": args.text_hidden_size,
        "intermediate_size": 4 * args.text_hidden_size,
        "num_hidden_layers": args.text_layers,
        "num_attention_heads": args.text_heads,
        "max_position_embeddings": args.max_text_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": args.vision_hidden_size,
        "intermediate_size": 4 * args.vision_hidden_size,
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


class _PairSampler:
    """Fresh image-caption batches from the world: single-object pictures and multi-object scenes, with no two images
    of a batch naming the same set of classes."""

    def __init__(self, world: SyntheticWorld, args: TinyCLIPArguments, rng: np.random.Generator):
        self.world, self.args, self.rng = world, args, rng

    def batch(self) -> tuple[np.ndarray, list[str]]:
        world, args, rng = self.world, self.args, self.rng
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


class _Prefetcher:
    """Draws the batches of a `_PairSampler` in a background thread, `depth` ahead, in order (so the stream is the
    same as drawing them in the loop): rendering is numpy / Python work that overlaps with torch's compute."""

    def __init__(self, sampler: _PairSampler, count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sampler, count), daemon=True)
        self._thread.start()

    def _run(self, sampler: _PairSampler, count: int):
        try:
            for _ in range(count):
                batch = sampler.batch()
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # re-raised in the consuming thread
            self._queue.put(("error", error))

    def next(self) -> tuple[np.ndarray, list[str]]:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


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

    Each step draws a fresh batch (see `_PairSampler`), and minimises `CLIPModel`'s own contrastive loss
    (`return_loss=True`) plus `dense_loss_weight` times [`patch_noun_loss`] (the caption's nouns, i.e. the words of
    the captions that are class names, each in a random short prompt of [`NOUN_PROMPTS`], grounded in the patch
    tokens), with AdamW, linear warm-up and cosine decay. No label map is used.

    Returns:
        `(CLIPModel, CLIPTokenizerFast)`: the trained model (eval mode) and its tokenizer.
    """
    args = args or TinyCLIPArguments()
    world_config = world_config or WorldConfig(image_size=args.image_size)
    if world_config.image_size != args.image_size:
        raise ValueError(f"World images of {world_config.image_size} px for a CLIP of {args.image_size} px.")
    world = SyntheticWorld(world_config)
    if tokenizer is None:
        tokenizer = train_clip_tokenizer(caption_corpus(world, seed=args.seed + 1), model_max_length=args.max_text_length)
    clip = build_tiny_clip(tokenizer, args)
    sampler = _PairSampler(world, args, np.random.default_rng(args.seed))
    prompt_rng = np.random.default_rng(args.seed + 1)
    class_words = {synthetic_class.name for synthetic_class in world.classes}
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, args.steps, args.warmup_fraction))
    clip.train()
    previous_threads = torch.get_num_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    batches = _Prefetcher(sampler, args.steps)
    try:
        _train_loop(clip, tokenizer, optimizer, scheduler, batches, class_words, prompt_rng, args, show_progress)
    finally:
        batches.close()
        torch.set_num_threads(previous_threads)
    clip.eval()
    if output_dir is not None:
        save_clip_folder(output_dir, clip, tokenizer, args, extra={"trained_on_captions": True})
    return clip, tokenizer


def _train_loop(clip, tokenizer, optimizer, scheduler, batches, class_words, prompt_rng, args, show_progress):
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="tiny CLIP", disable=not show_progress)
    running = None
    for step in progress:
        images, captions = batches.next()
        text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        outputs = clip(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=image_to_pixel_values(images),
            return_loss=True,
        )
        loss = outputs.loss
        dense = torch.zeros(())
        if args.dense_loss_weight > 0:
            nouns = [[word for word in caption.split() if word in class_words] for caption in captions]
            vocabulary = sorted({noun for caption_nouns in nouns for noun in caption_nouns})
            if vocabulary:
                targets = torch.tensor([[float(noun in caption_nouns) for noun in vocabulary] for caption_nouns in nouns])
                prompts = [str(prompt_rng.choice(NOUN_PROMPTS)).format(noun) for noun in vocabulary]
                noun_text = tokenizer(prompts, padding=True, return_tensors="pt")
                noun_embeds = clip.text_projection(clip.text_model(**noun_text).pooler_output)
                patches = patch_embeddings(clip, None, outputs.vision_model_output)
                dense = patch_noun_loss(
                    patches, F.normalize(noun_embeds, dim=-1), targets, clip.logit_scale, args.dense_temperature
                )
                loss = loss + args.dense_loss_weight * dense
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        values = (outputs.loss.item(), dense.item())
        running = values if running is None else tuple(0.9 * r + 0.1 * v for r, v in zip(running, values))
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
    statistics), and `tiny_clip_args.json` recording the recipe.
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
    record = {**asdict(args), **(extra or {})}
    (output_dir / "tiny_clip_args.json").write_text(json.dumps(record, indent=2) + "\n")
    return output_dir


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
        world = SyntheticWorld(world_config or WorldConfig(image_size=args.image_size))
        tokenizer = train_clip_tokenizer(caption_corpus(world, seed=args.seed + 1), model_max_length=args.max_text_length)
    clip = build_tiny_clip(tokenizer, args).eval()
    return save_clip_folder(output_dir, clip, tokenizer, args, extra={"trained_on_captions": False})


# ----------------------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_probe(
    clip: CLIPModel | str | os.PathLike,
    tokenizer=None,
    num_images: int = 200,
    seed: int = 12345,
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
        unseen classes), `mIoU`, `seen_mIoU`, `unseen_mIoU` (IoU over labelled pixels, in %), `per_class_IoU`,
        `num_pixels` and `confusion` (rows: true class, columns: predicted class, pixel counts).
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
    num_classes = benchmark.num_classes
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    samples = list(world.generate(num_images, seed=seed))
    grid = image_size // clip.config.vision_config.patch_size
    for start in range(0, num_images, batch_size):
        chunk = samples[start : start + batch_size]
        images = np.stack([sample[0] for sample in chunk])
        labels = np.stack([sample[1] for sample in chunk])
        patches = patch_embeddings(clip, image_to_pixel_values(images))  # (B, N, E)
        similarity = torch.einsum("bne,ce->bcn", patches, text).reshape(len(chunk), num_classes, grid, grid)
        similarity = F.interpolate(similarity, size=(image_size, image_size), mode="bilinear", align_corners=False)
        prediction = similarity.argmax(1).numpy()
        valid = labels != benchmark.ignore_index
        confusion += np.bincount(
            labels[valid].astype(np.int64) * num_classes + prediction[valid], minlength=num_classes**2
        ).reshape(num_classes, num_classes)
    return _probe_metrics(confusion, benchmark)


def _probe_metrics(confusion: np.ndarray, benchmark) -> dict[str, float]:
    true_positive = np.diag(confusion).astype(np.float64)
    support = confusion.sum(1).astype(np.float64)
    predicted = confusion.sum(0).astype(np.float64)
    union = support + predicted - true_positive
    iou = np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)
    seen, unseen = list(benchmark.seen_class_ids), list(benchmark.unseen_class_ids)

    def accuracy(ids):
        return float(100 * true_positive[ids].sum() / max(support[ids].sum(), 1))

    return {
        "pixel_accuracy": accuracy(list(range(benchmark.num_classes))),
        "seen_pixel_accuracy": accuracy(seen),
        "unseen_pixel_accuracy": accuracy(unseen),
        "mIoU": float(100 * np.nanmean(iou)),
        "seen_mIoU": float(100 * np.nanmean(iou[seen])),
        "unseen_mIoU": float(100 * np.nanmean(iou[unseen])),
        "per_class_IoU": {name: round(float(100 * v), 2) for name, v in zip(benchmark.class_names, iou)},
        "num_pixels": int(support.sum()),
        "confusion": confusion.tolist(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _without_confusion(probe: dict) -> dict:
    """A probe's figures without its confusion matrix (too long for a log line)."""
    return {key: value for key, value in probe.items() if key != "confusion"}


def train_and_probe(argv: list[str] | None = None) -> dict:
    """Train the tiny CLIP (and optionally the untrained control) and probe them; returns the probe results."""
    parser = argparse.ArgumentParser(description="Train a tiny CLIP on the synthetic world's image-caption pairs.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--quick", action="store_true", help="the short recipe used by the tests")
    parser.add_argument("--control_dir", default=None, help="also save the caption-untrained control CLIP here")
    parser.add_argument("--probe", action="store_true", help="run the patch-token probe on the result(s)")
    for arg_field in fields(TinyCLIPArguments):
        if arg_field.type in (int, float, "int", "float"):
            parser.add_argument(f"--{arg_field.name}", type=type(arg_field.default), default=None)
    namespace = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {
        f.name: getattr(namespace, f.name)
        for f in fields(TinyCLIPArguments)
        if getattr(namespace, f.name, None) is not None
    }
    args = TinyCLIPArguments.quick(**overrides) if namespace.quick else TinyCLIPArguments(**overrides)
    clip, tokenizer = train_tiny_clip(namespace.output_dir, args)
    results = {}
    if namespace.probe:
        results["trained"] = patch_probe(clip, tokenizer)
        logger.info("patch probe, trained CLIP: %s", json.dumps(_without_confusion(results["trained"])))
    if namespace.control_dir:
        save_untrained_clip(namespace.control_dir, args, tokenizer)
        if namespace.probe:
            results["control"] = patch_probe(namespace.control_dir)
            logger.info("patch probe, control CLIP: %s", json.dumps(_without_confusion(results["control"])))
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m clip_rc.toy.tiny_clip`: see [`train_and_probe`]; returns the exit status, 0 on success."""
    train_and_probe(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
