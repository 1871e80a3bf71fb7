"""
Weight conversion between CLIP-RC's reference implementation (the authors' mmsegmentation code, `uyzhang/CLIP-RC`),
OpenAI's CLIP checkpoints and this library.

- [`convert_original_checkpoint`]: a reference (mmcv) checkpoint -> [`CLIPRCForSemanticSegmentation`], the
  architecture read from the tensors (SPEC §8).
- [`to_original_state_dict`] / [`save_original_checkpoint`]: the inverse, so that a model trained here runs in the
  reference code.
- [`load_openai_clip`]: OpenAI's `ViT-B-16.pt` (TorchScript archive or plain state dict) -> `transformers.CLIPModel`,
  to start training with `CLIPRCForSemanticSegmentation.from_clip(load_openai_clip(path), config)`; archives are read
  by [`read_torchscript_tensors`], which runs nothing from the file (unlike `torch.jit.load`).
- [`main`]: the `clip-rc-convert` command line (also `python -m clip_rc.commands.convert`).

Name mapping (reference -> library), `{i}` a layer index; the towers' library names are those of the base model
(`clip_rc.` in front of them in `CLIPRCForSemanticSegmentation`, none in a Hub `CLIPModel`):

| reference | library |
|---|---|
| `backbone.conv1.weight` | `vision_model.embeddings.patch_embedding.weight` |
| `backbone.class_embedding` | `vision_model.embeddings.class_embedding` |
| `backbone.positional_embedding` | `vision_model.embeddings.position_embedding.weight` (1:1; the class-row quirk lives in the forward) |
| `backbone.region_level_bridge` | `vision_model.region_tokens` |
| `backbone.{prompt_embeddings, deep_prompt_embeddings, prompt_proj, prompt_norm}` | `vision_model.` same names |
| `backbone.ln_pre`, `backbone.ln_post` | `vision_model.pre_layrnorm`, `vision_model.post_layernorm` |
| `backbone.proj` (D, E), used as `x @ proj` | `visual_projection.weight` (E, D) = proj.T |
| `*.transformer.resblocks.{i}.attn.in_proj_{weight,bias}` (3D, ...) = [q; k; v] | `*.encoder.layers.{i}.self_attn.{q,k,v}_proj` |
| `*.resblocks.{i}.attn.out_proj`, `ln_1`, `mlp.c_fc`, `mlp.c_proj`, `ln_2` | `self_attn.out_proj`, `layer_norm1`, `mlp.fc1`, `mlp.fc2`, `layer_norm2` |
| `text_encoder.token_embedding`, `text_encoder.positional_embedding` | `text_model.embeddings.token_embedding`, `text_model.embeddings.position_embedding.weight` |
| `text_encoder.ln_final` | `text_model.final_layer_norm` |
| `text_encoder.text_projection` (W, E) | `text_projection.weight` (E, W) = text_projection.T |
| `decode_head.{q_proj, lateral_proj}` | `decode_head.` same names |
| `decode_head.decoder_{q,v}.layers.{i}.*` | `decode_head.decoder_{q,v}.{i}.*` |
| `decode_head.recovery_decoder.{linear_q_in, linear_k_in, decouple_q.{i}, decouple_v.{i}, linear_q_out, linear_k_out}` | `decode_head.recovery.{query_in, pixel_in, query_layers.{i}, pixel_layers.{i}, query_out, pixel_out}` |
| decoder layers' `self_attn.*`, `norm1.*` (never used by the reference's forward) | dropped |

OpenAI's layout is the same for the two towers with prefixes `visual.` and `` (plus `logit_scale`).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import io
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging

from ..configuration_clip_rc import CLIPRCConfig
from ..image_processing_clip_rc import CLIPRCImageProcessor
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
from ..presets import PRESETS
from ..processing_clip_rc import CLIPRCProcessor
from ..utils import (
    atomic_output_dir,
    atomic_path,
    check_model_folder,
    load_clip_rc_config,
    missing_weights,
    non_finite_tensors,
    setup_logging,
)


logger = logging.get_logger("clip_rc.commands.convert")  # also when run as __main__

__all__ = [
    "CheckpointConversionError",
    "ORIGINAL_LAYOUT",
    "OPENAI_LAYOUT",
    "convert_original_checkpoint",
    "original_to_library_state_dict",
    "to_original_state_dict",
    "save_original_checkpoint",
    "load_openai_clip",
    "openai_to_hub_state_dict",
    "load_checkpoint_file",
    "read_original_architecture",
    "read_torchscript_tensors",
    "main",
]


class CheckpointConversionError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and the offending keys."""


# ---- the name mapping ----------------------------------------------------------------------------------------------

COPY, TRANSPOSE, QKV = "copy", "transpose", "qkv"


@dataclass(frozen=True)
class Layout:
    """Prefixes of a foreign layout: image tower, text tower, decode head."""

    name: str
    vision: str
    text: str
    head: str = "decode_head."


ORIGINAL_LAYOUT = Layout("reference (mmsegmentation)", vision="backbone.", text="text_encoder.")
OPENAI_LAYOUT = Layout("OpenAI CLIP", vision="visual.", text="")


def _rules(*pairs):
    return tuple((re.compile(pattern + r"$"), template, kind) for pattern, template, kind in pairs)


# Library name (after the tower prefix) -> foreign name template (groups formatted in), transform.
_LAYER_RULES = (
    (
        r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
        "transformer.resblocks.{0}.attn.in_proj_{2}",
        QKV,
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        "transformer.resblocks.{0}.attn.out_proj.{1}",
        COPY,
    ),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", "transformer.resblocks.{0}.ln_1.{1}", COPY),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "transformer.resblocks.{0}.mlp.c_fc.{1}", COPY),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "transformer.resblocks.{0}.mlp.c_proj.{1}", COPY),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", "transformer.resblocks.{0}.ln_2.{1}", COPY),
)
_VISION_RULES = _rules(
    *_LAYER_RULES,
    (r"embeddings\.class_embedding", "class_embedding", COPY),
    (r"embeddings\.patch_embedding\.weight", "conv1.weight", COPY),
    (r"embeddings\.position_embedding\.weight", "positional_embedding", COPY),
    (r"pre_layrnorm\.(weight|bias)", "ln_pre.{0}", COPY),
    (r"post_layernorm\.(weight|bias)", "ln_post.{0}", COPY),
    (r"region_tokens", "region_level_bridge", COPY),
    (r"(prompt_embeddings|deep_prompt_embeddings)", "{0}", COPY),
    (r"(prompt_proj|prompt_norm)\.(weight|bias)", "{0}.{1}", COPY),
)
_TEXT_RULES = _rules(
    *_LAYER_RULES,
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight", COPY),
    (r"embeddings\.position_embedding\.weight", "positional_embedding", COPY),
    (r"final_layer_norm\.(weight|bias)", "ln_final.{0}", COPY),
)
_HEAD_RULES = _rules(
    (r"(q_proj|lateral_proj)\.(weight|bias)", "{0}.{1}", COPY),
    (r"decoder_([qv])\.(\d+)\.(.+)", "decoder_{0}.layers.{1}.{2}", COPY),
    (r"recovery\.query_layers\.(\d+)\.(.+)", "recovery_decoder.decouple_q.{0}.{1}", COPY),
    (r"recovery\.pixel_layers\.(\d+)\.(.+)", "recovery_decoder.decouple_v.{0}.{1}", COPY),
    (r"recovery\.query_in\.(weight|bias)", "recovery_decoder.linear_q_in.{0}", COPY),
    (r"recovery\.pixel_in\.(weight|bias)", "recovery_decoder.linear_k_in.{0}", COPY),
    (r"recovery\.query_out\.(weight|bias)", "recovery_decoder.linear_q_out.{0}", COPY),
    (r"recovery\.pixel_out\.(weight|bias)", "recovery_decoder.linear_k_out.{0}", COPY),
)

# Weights of the reference's decoder layers that its forward never reads (torch's TransformerDecoderLayer keeps a
# self-attention and its norm, which the reference's cross-only subclass skips).
_UNUSED_DECODER_PARAMS = (
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "norm1.weight",
    "norm1.bias",
)
_UNUSED_ORIGINAL = re.compile(
    r"^decode_head\.(decoder_[qv]\.layers|recovery_decoder\.decouple_[qv])\.\d+\.("
    + "|".join(re.escape(name) for name in _UNUSED_DECODER_PARAMS)
    + r")$"
)
# Bookkeeping entries some OpenAI state dicts carry (OpenAI's own `build_model` deletes them too).
_UNUSED_OPENAI = re.compile(r"^(input_resolution|context_length|vocab_size)$")

# Not stored by the reference: it reads its class embeddings from a .npy file or computes them at run time.
_LIBRARY_ONLY = ("class_embeddings",)


@dataclass(frozen=True)
class _Slot:
    """Where one library tensor lives in a foreign layout."""

    library_name: str
    foreign_name: str
    kind: str
    part: int = 0


def _match(rules, local_name: str) -> tuple[str, str, int] | None:
    for pattern, template, kind in rules:
        found = pattern.match(local_name)
        if found:
            groups = found.groups()
            part = "qkv".index(groups[1]) if kind == QKV else 0
            return template.format(*groups), kind, part
    return None


def _foreign_slot(name: str, layout: Layout) -> _Slot | None:
    """The foreign name of a library tensor, `None` for tensors the foreign layout does not store."""
    if name in _LIBRARY_ONLY:
        return None
    # CLIP-RC holds CLIP's towers in its base model; a Hub `CLIPModel` holds them at the top.
    tower_name = name.removeprefix("clip_rc.")
    if tower_name == "visual_projection.weight":
        return _Slot(name, layout.vision + "proj", TRANSPOSE)
    if tower_name == "text_projection.weight":
        return _Slot(name, layout.text + "text_projection", TRANSPOSE)
    if tower_name == "logit_scale":
        return _Slot(name, "logit_scale", COPY)
    for library_prefix, foreign_prefix, rules in (
        ("vision_model.", layout.vision, _VISION_RULES),
        ("text_model.", layout.text, _TEXT_RULES),
        ("decode_head.", layout.head, _HEAD_RULES),
    ):
        if tower_name.startswith(library_prefix):
            matched = _match(rules, tower_name[len(library_prefix) :])
            if matched is not None:
                foreign_name, kind, part = matched
                return _Slot(name, foreign_prefix + foreign_name, kind, part)
    raise KeyError(f"No {layout.name} name known for the library tensor {name!r}.")


def _slot_table(library_names, layout: Layout) -> dict[str, list[_Slot]]:
    """Foreign name -> the library tensors it holds (three for a fused q/k/v, in q, k, v order)."""
    table: dict[str, list[_Slot]] = {}
    for name in library_names:
        slot = _foreign_slot(name, layout)
        if slot is not None:
            table.setdefault(slot.foreign_name, []).append(slot)
    for slots in table.values():
        slots.sort(key=lambda slot: slot.part)
    return table


def _foreign_shape(slots: list[_Slot], library_shapes: Mapping[str, tuple]) -> tuple[int, ...]:
    shape = tuple(library_shapes[slots[0].library_name])
    kind = slots[0].kind
    if kind == TRANSPOSE:
        return shape[::-1]
    if kind == QKV:
        return (3 * shape[0], *shape[1:])
    return shape


def _to_library(
    source: Mapping[str, torch.Tensor],
    library_shapes: Mapping[str, tuple],
    layout: Layout,
    unused: re.Pattern,
    origin: str,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a foreign state dict onto library names; any missing, unexpected or mis-shaped tensor is an error."""
    table = _slot_table(library_shapes, layout)
    state: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for foreign_name, slots in table.items():
        if foreign_name not in source:
            missing.append(foreign_name)
            continue
        tensor = source[foreign_name]
        expected = _foreign_shape(slots, library_shapes)
        if tuple(tensor.shape) != expected:
            mismatched.append(f"{foreign_name}: expected {list(expected)}, found {list(tensor.shape)}")
            continue
        kind = slots[0].kind
        if kind == QKV:
            for slot, chunk in zip(slots, tensor.chunk(3, dim=0)):
                state[slot.library_name] = chunk.clone()
        elif kind == TRANSPOSE:
            state[slots[0].library_name] = tensor.t().contiguous()
        else:
            state[slots[0].library_name] = tensor
    dropped = [name for name in source if name not in table and unused.match(name)]
    unexpected = [name for name in source if name not in table and not unused.match(name)]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise CheckpointConversionError(
            f"{origin} does not match the expected {layout.name} layout: " + "; ".join(problems)
        )
    return state, dropped


def _from_library(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Library state dict -> foreign names (fused q/k/v, transposed projections)."""
    foreign: dict[str, torch.Tensor] = {}
    for foreign_name, slots in _slot_table(state, layout).items():
        kind = slots[0].kind
        if kind == QKV:
            foreign[foreign_name] = torch.cat([state[slot.library_name] for slot in slots], dim=0)
        elif kind == TRANSPOSE:
            foreign[foreign_name] = state[slots[0].library_name].t().contiguous()
        else:
            foreign[foreign_name] = state[slots[0].library_name].clone()
    return foreign


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _refuse_non_finite(state: Mapping[str, torch.Tensor], origin: str):
    """A checkpoint whose weights hold NaN or infinity (e.g. from a diverged run) is not converted."""
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointConversionError(
            f"{origin} holds NaN or infinite values in {len(bad)} tensors: {_listing(bad)}. Refusing to convert it."
        )


# ---- reading checkpoint files --------------------------------------------------------------------------------------

# Globals a weights-only load may accept beyond torch's defaults: numpy scalars and dtypes, which mmcv puts in the
# `meta` of some checkpoints (e.g. a best score). They rebuild plain values; no code runs.
_NUMPY_GLOBALS = re.compile(r"^numpy\.(_?core\.multiarray\.scalar|dtype|dtypes\.\w+DType)$")


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _resolve_global(qualified_name: str):
    module_name, _, attribute = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def load_checkpoint_file(path: str | os.PathLike) -> object:
    """
    `torch.load(path, map_location="cpu", weights_only=True)` with errors that name the file: a missing or truncated
    file, a TorchScript archive, or a pickle that needs arbitrary code (refused). numpy scalars / dtypes (found in the
    `meta` of some mmcv checkpoints) are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (or is not a file).")
    if _is_torchscript_archive(path):
        raise CheckpointConversionError(
            f"{path} is a TorchScript archive (e.g. OpenAI's ViT-B-16.pt), not a training checkpoint; "
            "load CLIP weights with `load_openai_clip`."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001, F841 - a damaged file can fail in the unpickler with any error type
        unsafe = _unsafe_globals(path)
        if unsafe and all(_NUMPY_GLOBALS.match(name) for name in unsafe):
            try:
                with torch.serialization.safe_globals([_resolve_global(name) for name in unsafe]):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as retry_error:  # noqa: BLE001 - reported with the file name below
                error = retry_error
        # Legacy (non-zip) pickles cannot be inspected up front; the unpickler names the refused global.
        refused = isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error)
        if unsafe or refused:
            names = f" (it references {', '.join(unsafe)})" if unsafe else ""
            raise CheckpointConversionError(
                f"Refusing to load {path}: it is a pickle that needs arbitrary code to load{names}, which "
                f"`torch.load(weights_only=True)` does not allow. Only plain tensor checkpoints are accepted. "
                f"({error})"
            ) from error
        raise CheckpointConversionError(
            f"Cannot read {path}: the file is truncated, corrupt or not a PyTorch checkpoint "
            f"({type(error).__name__}: {error})."
        ) from error


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) pickles cannot be inspected
        return []


def _extract_state_dict(loaded: object, origin: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a bare state dict or of mmcv's `{"state_dict", "meta", "optimizer"}`, and the meta."""
    meta = {}
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        meta = loaded.get("meta") or {}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointConversionError(f"{origin} holds a {type(loaded).__name__}, not a state dict.")
    not_tensors = [str(name) for name, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointConversionError(f"{origin}: entries that are not tensors: {_listing(not_tensors)}")
    state = dict(loaded)
    # A state dict saved from a DataParallel / DistributedDataParallel wrapper.
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module.") :]: tensor for name, tensor in state.items()}
    return state, dict(meta) if isinstance(meta, Mapping) else {}


def _load_state(path_or_state_dict, what: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    if isinstance(path_or_state_dict, Mapping):
        origin = f"the given {what} state dict"
        state, meta = _extract_state_dict(path_or_state_dict, origin)
    else:
        origin = f"checkpoint {path_or_state_dict}"
        state, meta = _extract_state_dict(load_checkpoint_file(path_or_state_dict), origin)
    return state, meta, origin


# ---- architecture from the tensors ---------------------------------------------------------------------------------


def _count_indices(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(found.group(1)) for name in state if (found := pattern.match(name))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointConversionError(f"Layer indices under {prefix!r} are not contiguous: {sorted(indices)}.")
    return len(indices)


class _Reader:
    def __init__(self, state, origin):
        self.state, self.origin, self.missing = state, origin, []

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.state:
            self.missing.append(name)
            return None
        return tuple(self.state[name].shape)

    def check(self):
        if self.missing:
            raise CheckpointConversionError(
                f"Cannot read the architecture from {self.origin}: it lacks {_listing(self.missing)}."
            )


def _square_root(value: int, what: str, origin: str) -> int:
    root = math.isqrt(value)
    if root * root != value:
        raise CheckpointConversionError(f"{origin}: {what} ({value}) is not a square number.")
    return root


def _read_tower(reader: _Reader, prefix: str, width_key: str) -> dict:
    width_shape = reader.shape(prefix + width_key)
    num_layers = _count_indices(reader.state, prefix + "transformer.resblocks.")
    fc_shape = reader.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    reader.check()
    if num_layers == 0:
        raise CheckpointConversionError(f"{reader.origin}: no layers under {prefix}transformer.resblocks.")
    return {"hidden_size": width_shape[0], "num_hidden_layers": num_layers, "intermediate_size": fc_shape[0]}


def read_original_architecture(state: Mapping[str, torch.Tensor], origin: str = "the checkpoint") -> dict:
    """
    Every size of a reference checkpoint that its tensors determine. Attention head counts are not among them (a
    fused q/k/v matrix has the same shape for any head count).

    Returns:
        `dict` with `vision` and `text` (CLIP sub-config values), `projection_dim`, `crop_size`, `num_prompt_tokens`,
        `region_grid_size`, `decoder_hidden_size`, `decoder_intermediate_size`, `decoder_num_layers`,
        `recovery_num_layers`.
    """
    reader = _Reader(state, origin)
    vision = _read_tower(reader, "backbone.", "ln_post.weight")
    text = _read_tower(reader, "text_encoder.", "ln_final.weight")
    conv = reader.shape("backbone.conv1.weight")
    positions = reader.shape("backbone.positional_embedding")
    projection = reader.shape("backbone.proj")
    text_projection = reader.shape("text_encoder.text_projection")
    prompts = reader.shape("backbone.prompt_embeddings")
    deep_prompts = reader.shape("backbone.deep_prompt_embeddings")
    regions = reader.shape("backbone.region_level_bridge")
    tokens = reader.shape("text_encoder.token_embedding.weight")
    text_positions = reader.shape("text_encoder.positional_embedding")
    q_proj = reader.shape("decode_head.q_proj.weight")
    linear1 = reader.shape("decode_head.decoder_q.layers.0.linear1.weight")
    reader.check()

    patch_size = conv[-1]
    grid = _square_root(positions[0] - 1, "the number of patch position rows", origin)
    region_grid = _square_root(regions[0], "the number of region tokens", origin)
    num_layers = vision["num_hidden_layers"]
    if deep_prompts[0] != num_layers - 1:
        raise CheckpointConversionError(
            f"{origin}: {deep_prompts[0]} deep prompts for {num_layers} layers; CLIP-RC prompts every layer "
            f"(total_d_layer = layers - 1 = {num_layers - 1})."
        )
    if projection[1] != text_projection[1]:
        raise CheckpointConversionError(
            f"{origin}: image projection width {projection[1]} differs from text projection width {text_projection[1]}."
        )
    vision.update(patch_size=patch_size, num_channels=conv[1])
    text.update(vocab_size=tokens[0], max_position_embeddings=text_positions[0])
    return {
        "vision": vision,
        "text": text,
        "projection_dim": projection[1],
        "crop_size": grid * patch_size,
        "num_prompt_tokens": prompts[1],
        "region_grid_size": region_grid,
        "decoder_hidden_size": q_proj[0],
        "decoder_intermediate_size": linear1[0],
        "decoder_num_layers": _count_indices(state, "decode_head.decoder_q.layers."),
        "recovery_num_layers": _count_indices(state, "decode_head.recovery_decoder.decouple_q."),
    }


def _heads(width: int, base_width: int, base_heads: int, override: int | None, what: str) -> int:
    """Attention heads: explicit override, else the preset's when the width matches it, else CLIP's width / 64."""
    if override is not None:
        heads = override
    elif width == base_width:
        heads = base_heads
    else:
        if width % 64:
            raise CheckpointConversionError(
                f"The {what} is {width} wide, unlike the preset ({base_width}), and {width} is not a multiple of 64: "
                f"give its attention head count explicitly (a config, or --{what.split()[0]}-heads)."
            )
        heads = width // 64
        logger.warning(
            "%s: %d wide, unlike the preset; using CLIP's rule heads = width / 64 = %d.", what, width, heads
        )
    if heads < 1 or width % heads:
        raise CheckpointConversionError(f"The {what} width {width} is not divisible into {heads} heads.")
    return heads


def _config_from_architecture(
    architecture: dict, base: CLIPRCConfig, vision_num_heads=None, text_num_heads=None, decoder_num_heads=None
) -> CLIPRCConfig:
    """`base` (a preset: class names, split, setting, templates, loss weights) with the checkpoint's sizes."""
    values = base.to_dict()
    projection_dim = architecture["projection_dim"]
    vision = _tower_config(
        values["vision_config"], architecture["vision"], base.vision_config, vision_num_heads, "vision tower"
    )
    text = _tower_config(values["text_config"], architecture["text"], base.text_config, text_num_heads, "text tower")
    vision["projection_dim"] = text["projection_dim"] = projection_dim
    _use_clip_token_ids(text)
    crop_size = architecture["crop_size"]
    values.update(
        vision_config=vision,
        text_config=text,
        projection_dim=projection_dim,
        crop_size=crop_size,
        sliding_window_stride=_window_stride(crop_size, base),
        num_prompt_tokens=architecture["num_prompt_tokens"],
        region_grid_size=architecture["region_grid_size"],
        decoder_hidden_size=architecture["decoder_hidden_size"],
        decoder_intermediate_size=architecture["decoder_intermediate_size"],
        decoder_num_layers=architecture["decoder_num_layers"],
        recovery_num_layers=architecture["recovery_num_layers"],
        decoder_num_attention_heads=decoder_num_heads or base.decoder_num_attention_heads,
    )
    for key in ("transformers_version", "architectures", "auto_map", "model_type"):
        values.pop(key, None)
    return CLIPRCConfig(**values)


def _tower_config(base_values: dict, sizes: dict, base_tower, num_heads: int | None, what: str) -> dict:
    """A tower's config fields: the preset's, with the checkpoint's sizes and a head count that fits its width."""
    tower = {**base_values, **sizes}
    tower["num_attention_heads"] = _heads(
        tower["hidden_size"], base_tower.hidden_size, base_tower.num_attention_heads, num_heads, what
    )
    return tower


def _use_clip_token_ids(text: dict):
    """Special token ids inside the checkpoint's vocabulary: CLIP's end-of-text token is the highest id (the
    reference pools at `input_ids.argmax()`), beginning-of-text the one before."""
    vocab_size = text["vocab_size"]
    if any(text.get(key) is not None and text[key] >= vocab_size for key in ("eos_token_id", "bos_token_id")):
        logger.warning(
            "The checkpoint's vocabulary has %d tokens: using eos_token_id=%d, bos_token_id=%d (CLIP's convention: "
            "the last two ids).",
            vocab_size,
            vocab_size - 1,
            vocab_size - 2,
        )
        text.update(eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2)
        if text.get("pad_token_id") is not None and text["pad_token_id"] >= vocab_size:
            text["pad_token_id"] = vocab_size - 1


def _window_stride(crop_size: int, base: CLIPRCConfig) -> int:
    """The preset's sliding-window stride, scaled when the checkpoint's crop (from its position table) differs."""
    if crop_size == base.crop_size:
        return base.sliding_window_stride
    stride = max(1, round(crop_size * base.sliding_window_stride / base.crop_size))
    logger.warning(
        "Crop size %d (from the position table) differs from the preset's %d: sliding-window stride set to %d.",
        crop_size,
        base.crop_size,
        stride,
    )
    return stride


# ---- reference checkpoint -> library -------------------------------------------------------------------------------


@dataclass
class ConversionSummary:
    """What a conversion did (for the command line's report)."""

    origin: str
    num_tensors: int = 0
    dropped: list[str] = field(default_factory=list)
    class_embeddings: str = "not set"
    meta: dict = field(default_factory=dict)


def original_to_library_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: CLIPRCConfig, origin: str = "the reference state dict"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """
    Rename a reference state dict (mmcv wrapper already removed) to this library's names, checking every shape
    against `config`. Returns the library state dict (without `class_embeddings`) and the dropped unused keys.
    """
    with torch.device("meta"):
        skeleton = CLIPRCForSemanticSegmentation(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    return _to_library(state_dict, shapes, ORIGINAL_LAYOUT, _UNUSED_ORIGINAL, origin)


def convert_original_checkpoint(
    path,
    config: CLIPRCConfig | None = None,
    tokenizer=None,
    *,
    preset: str | None = None,
    class_embeddings: torch.Tensor | str | os.PathLike | None = None,
    vision_num_heads: int | None = None,
    text_num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> CLIPRCForSemanticSegmentation:
    """
    Load a checkpoint of the reference implementation as a [`CLIPRCForSemanticSegmentation`].

    Args:
        path: the `.pth` file (mmcv's `{"state_dict", "meta", "optimizer"}` or a bare state dict), or such a dict.
        config: the exact configuration; every tensor shape is checked against it (mismatches raise a
            `CheckpointConversionError` listing key, expected and found shapes).
        tokenizer: a CLIP tokenizer; when given, the class embeddings of the config's classes (its templates) are
            computed with the converted text tower and persisted in the model.
        preset: without `config`, the recipe ([`CLIPRCConfig.from_preset`]) giving class names, zero-shot split,
            setting, templates and loss weights (default `voc-inductive`); the sizes come from the tensors.
        class_embeddings: `(C, E)` class embeddings (a tensor or the reference's `.npy` file), instead of a tokenizer.
        vision_num_heads, text_num_heads, decoder_num_heads: head counts, which tensors cannot tell. Default: the
            config's / preset's, or CLIP's width / 64 for a tower whose width differs from the preset's.

    The reference's unused decoder weights (`self_attn.*`, `norm1.*`) are dropped (logged); any other missing,
    unexpected or mis-shaped tensor is an error.
    """
    model, _ = _convert_original(
        path,
        config,
        tokenizer,
        preset=preset,
        class_embeddings=class_embeddings,
        vision_num_heads=vision_num_heads,
        text_num_heads=text_num_heads,
        decoder_num_heads=decoder_num_heads,
    )
    return model


def _convert_original(
    path,
    config,
    tokenizer,
    *,
    preset=None,
    class_embeddings=None,
    vision_num_heads=None,
    text_num_heads=None,
    decoder_num_heads=None,
) -> tuple[CLIPRCForSemanticSegmentation, ConversionSummary]:
    state, meta, origin = _load_state(path, "reference")
    _refuse_non_finite(state, origin)
    summary = ConversionSummary(origin=origin, meta=meta)
    if config is None:
        if preset is None:
            logger.warning("No config or preset given: using the voc-inductive preset for class names and split.")
            preset = "voc-inductive"
        architecture = read_original_architecture(state, origin)
        config = _config_from_architecture(
            architecture, CLIPRCConfig.from_preset(preset), vision_num_heads, text_num_heads, decoder_num_heads
        )
    elif any(value is not None for value in (preset, vision_num_heads, text_num_heads, decoder_num_heads)):
        raise ValueError("With an explicit `config`, do not also pass a preset or head counts.")

    library_state, dropped = original_to_library_state_dict(state, config, origin)
    if dropped:
        logger.info(
            "Dropped %d tensors of %s that the reference never uses (decoder self-attention and norm1).",
            len(dropped),
            origin,
        )
    classes = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    if classes is not None and len(classes) != config.num_labels:
        logger.warning(
            "%s was trained with %d classes (meta CLASSES), the config has %d.",
            origin,
            len(classes),
            config.num_labels,
        )

    model = CLIPRCForSemanticSegmentation(config)
    missing, unexpected = model.load_state_dict(library_state, strict=False)
    if unexpected or set(missing) != set(_LIBRARY_ONLY):
        raise RuntimeError(f"Internal mapping error: missing {missing}, unexpected {unexpected}.")
    model.eval()
    summary.num_tensors = len(state)
    summary.dropped = dropped

    summary.class_embeddings = _set_class_embeddings(model, class_embeddings, tokenizer, origin)
    return model, summary


def _set_class_embeddings(model, class_embeddings, tokenizer, origin: str) -> str:
    """Persist the converted model's class embeddings: the given ones, or its text tower's for its class names (the
    reference keeps them outside the checkpoint); returns where they came from."""
    config = model.config
    if class_embeddings is not None:
        embeddings = _read_class_embeddings(class_embeddings).detach().float()
        source = "the given" if isinstance(class_embeddings, torch.Tensor) else f"the file {class_embeddings} of"
        _refuse_non_finite({"class_embeddings": embeddings}, f"{source} class embeddings")
        model.set_class_embeddings(embeddings)
        if torch.allclose(embeddings.norm(dim=-1), torch.ones(()), atol=1e-4):
            # Already unit length (as the reference's .npy files): keep the exact values the reference uses.
            model.class_embeddings = embeddings.clone()
        else:
            logger.warning(
                "The given class embeddings are not unit length: stored normalised (the reference would use them "
                "as they are)."
            )
        return "from the given embeddings"
    if tokenizer is not None:
        processor = CLIPRCProcessor(CLIPRCImageProcessor.from_model_config(config), tokenizer)
        prompts = processor.tokenize_class_names(config.class_names, config.prompt_templates, return_tensors="pt")
        model.set_class_embeddings(model.clip_rc.encode_class_prompts(prompts["input_ids"], prompts["attention_mask"]))
        return f"computed with the converted text tower ({config.num_labels} classes x {len(config.prompt_templates)} templates)"
    logger.warning(
        "No tokenizer given: the class embeddings of %s are not set (the reference keeps them outside the "
        "checkpoint). Call model.set_class_embeddings(...) or pass text_embeds / input_ids at run time.",
        origin,
    )
    return "not set"


def _read_class_embeddings(source) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    path = Path(source)
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    loaded = load_checkpoint_file(path)
    if not isinstance(loaded, torch.Tensor):
        raise CheckpointConversionError(f"{path} does not hold a (C, E) tensor of class embeddings.")
    return loaded


# ---- library -> reference checkpoint -------------------------------------------------------------------------------


def to_original_state_dict(
    model_or_state_dict: CLIPRCForSemanticSegmentation | Mapping[str, torch.Tensor],
    include_unused_weights: bool = True,
) -> dict[str, torch.Tensor]:
    """
    This library's weights under the reference's names (`backbone.*`, `text_encoder.*`, `decode_head.*`).

    Args:
        include_unused_weights: also emit the decoder layers' `self_attn.*` and `norm1.*`, which the reference builds
            (torch's `TransformerDecoderLayer`) but never uses, as zeros: mmcv's `load_checkpoint` is non-strict by
            default and would only warn about them, but a strict load (or a resume) needs them.
    """
    state = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    original = _from_library(state, ORIGINAL_LAYOUT)
    if include_unused_weights:
        for name in [name for name in original if name.endswith(".linear1.weight")]:
            layer = name[: -len("linear1.weight")]
            hidden_size = original[name].shape[1]
            reference = original[name]
            zeros = {
                "self_attn.in_proj_weight": (3 * hidden_size, hidden_size),
                "self_attn.in_proj_bias": (3 * hidden_size,),
                "self_attn.out_proj.weight": (hidden_size, hidden_size),
                "self_attn.out_proj.bias": (hidden_size,),
                "norm1.weight": (hidden_size,),
                "norm1.bias": (hidden_size,),
            }
            for suffix, shape in zeros.items():
                original[layer + suffix] = torch.zeros(shape, dtype=reference.dtype)
    return original


def _write_atomic(path: Path, write) -> None:
    """`write(handle)` into a binary file that replaces `path` only once complete (see `atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        write(handle)


def save_original_checkpoint(
    model: CLIPRCForSemanticSegmentation, path: str | os.PathLike, include_unused_weights: bool = True
) -> list[Path]:
    """
    Write `model` as a reference checkpoint `{"state_dict": ..., "meta": {...}}` at `path` (atomically), and, when the
    model has class embeddings, the `(C, E)` float32 array the reference reads through `load_text_embedding`
    beside it (`<stem>_text_embedding.npy`). Returns the files written.
    """
    path = Path(path)
    config = model.config
    _refuse_non_finite(model.state_dict(), f"the model {getattr(config, 'name_or_path', '') or '(in memory)'}")
    meta = {
        "CLASSES": tuple(config.class_names),
        "seen_class_ids": list(config.resolved_seen_class_ids),
        "setting": config.setting,
        "converted_by": "clip_rc.commands.convert",
        "clip_rc_config": config.to_json_string(use_diff=False),
    }
    checkpoint = {"state_dict": to_original_state_dict(model, include_unused_weights), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path]
    _write_atomic(path, lambda handle: torch.save(checkpoint, handle))
    embeddings = model.class_embeddings.detach().float().cpu()
    if bool(embeddings.abs().sum() > 0):
        import numpy as np

        npy_path = path.with_name(path.stem + "_text_embedding.npy")
        _write_atomic(npy_path, lambda handle: np.save(handle, embeddings.numpy(), allow_pickle=False))
        written.append(npy_path)
    return written


# ---- TorchScript archives, tensors only -----------------------------------------------------------------------------

# Storage types a TorchScript archive's data.pkl names, and the dtypes of their bytes.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip
_DECLARED_STATE = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n)*)", re.MULTILINE)
_DECLARED_NAMES = re.compile(r"^  __(parameters|buffers)__ = \[(.*)\]$", re.MULTILINE)


class _ScriptObject:
    """A module of a TorchScript archive rebuilt as plain data: its class name (a subclass per class of the archive)
    and its attributes."""

    qualified_name = ""
    attributes: dict = {}

    def __setstate__(self, state):
        self.attributes = dict(state) if isinstance(state, Mapping) else {}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch.as_strided(storage, size, stride, offset).clone()


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl into [`_ScriptObject`]s and tensors; any other global (any code)
    is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, origin: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix, self.origin = archive, prefix, origin
        self.script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified_name = f"{module}.{name}"
            if qualified_name not in self.script_classes:
                self.script_classes[qualified_name] = type(
                    "ScriptObject", (_ScriptObject,), {"qualified_name": qualified_name}
                )
            return self.script_classes[qualified_name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{self.origin} references {module}.{name}, which a tensor archive does not need")

    def persistent_load(self, record):
        kind, dtype, key, _location, numel = record
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"{self.origin}: unknown storage record {record!r}")
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        return torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)


def _declared_state_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Qualified class name -> names of its parameters and buffers, as the archive's code declares them (read as
    text, never run)."""
    declared = {}
    for entry in archive.namelist():
        if not (entry.startswith(f"{prefix}code/") and entry.endswith(".py")):
            continue
        module = entry[len(f"{prefix}code/") : -len(".py")].replace("/", ".")
        for class_name, body in _DECLARED_STATE.findall(archive.read(entry).decode("utf-8", errors="replace")):
            names = set()
            for _, listed in _DECLARED_NAMES.findall(body):
                names.update(name.strip().strip("\"'") for name in listed.split(",") if name.strip())
            declared[f"{module}.{class_name}"] = names
    return declared


def _collect_state(node: _ScriptObject, declared: dict[str, set[str]], prefix: str, state: dict):
    """The parameters and buffers of `node` and its submodules, named as `state_dict()` names them."""
    state_names = declared.get(node.qualified_name)
    for name, value in node.attributes.items():
        if isinstance(value, _ScriptObject):
            _collect_state(value, declared, f"{prefix}{name}.", state)
        elif isinstance(value, torch.Tensor) and (state_names is None or name in state_names):
            state[f"{prefix}{name}"] = value


def _archive_prefix(archive: zipfile.ZipFile, origin: str) -> str:
    """The top folder of a TorchScript archive (`ViT-B-16/` ...), after checking it holds tensors this machine
    reads as stored."""
    prefixes = [name[: -len("data.pkl")] for name in archive.namelist() if name.endswith("/data.pkl")]
    prefixes = [prefix for prefix in prefixes if prefix.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointConversionError(f"{origin} has {len(prefixes)} top-level data.pkl files, not one.")
    byteorder_file = f"{prefixes[0]}byteorder"
    byteorder = archive.read(byteorder_file).decode().strip() if byteorder_file in archive.namelist() else "little"
    if byteorder != sys.byteorder:
        raise CheckpointConversionError(f"{origin} stores {byteorder}-endian tensors, this machine reads "
                                        f"{sys.byteorder}-endian ones.")  # fmt: skip
    return prefixes[0]


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    The parameters and buffers of a TorchScript archive (e.g. OpenAI's `ViT-B-16.pt`), named as its `state_dict()`
    names them, read without running anything from the archive: its `data.pkl` is unpickled by an unpickler that only
    rebuilds tensors and plain module records (any other global is refused), and which attributes are parameters or
    buffers is read from the class declarations of its code, as text. `torch.jit.load` instead compiles the
    archive's TorchScript code and runs parts of it while loading.
    """
    path = Path(path)
    origin = f"TorchScript archive {path}"
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, origin)
            root = _TensorsOnlyUnpickler(archive, prefix, origin).load()
            declared = _declared_state_names(archive, prefix)
    except CheckpointConversionError:
        raise
    except (
        zipfile.BadZipFile,
        OSError,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        RuntimeError,
    ) as error:
        raise CheckpointConversionError(f"Cannot read the tensors of {origin}: {error}") from error
    if not isinstance(root, _ScriptObject):
        raise CheckpointConversionError(f"{origin} holds a {type(root).__name__}, not a module.")
    state: dict[str, torch.Tensor] = {}
    _collect_state(root, declared, "", state)
    return state


# ---- OpenAI CLIP -----------------------------------------------------------------------------------------------


def _read_openai_state(path_or_state_dict, trust_torchscript: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(path_or_state_dict, Mapping):
        state, _ = _extract_state_dict(path_or_state_dict, "the given OpenAI CLIP state dict")
        return state, "the given OpenAI CLIP state dict"
    path = Path(path_or_state_dict)
    origin = f"OpenAI CLIP checkpoint {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{origin} does not exist (or is not a file).")
    if not _is_torchscript_archive(path):
        state, _ = _extract_state_dict(load_checkpoint_file(path), origin)
    elif not trust_torchscript:
        # OpenAI's released files are TorchScript archives (fp16); their parameters hold the weights.
        state = read_torchscript_tensors(path)
    else:
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as error:
            raise CheckpointConversionError(f"Cannot read the TorchScript archive {path}: {error}") from error
    return dict(state), origin


def openai_to_hub_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: CLIPConfig, origin: str = "the OpenAI state dict"
) -> dict[str, torch.Tensor]:
    """Rename an OpenAI CLIP state dict to `transformers.CLIPModel`'s names (q/k/v split, projections transposed),
    checking every shape against `config`."""
    with torch.device("meta"):
        skeleton = CLIPModel(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    state, _ = _to_library(state_dict, shapes, OPENAI_LAYOUT, _UNUSED_OPENAI, origin)
    return state


def load_openai_clip(
    path_or_state_dict,
    vision_num_heads: int | None = None,
    text_num_heads: int | None = None,
    trust_torchscript: bool = False,
) -> CLIPModel:
    """
    OpenAI's CLIP weights (the TorchScript archive `ViT-B-16.pt` as released, or a plain state dict of its layout,
    as a file or a dict) as a float32 `transformers.CLIPModel`, equal to the same weights in the Hub's format.

    A TorchScript archive is read with [`read_torchscript_tensors`], which runs nothing from the file;
    `trust_torchscript=True` reads it with `torch.jit.load` instead, which compiles and runs the archive's code (only
    for files you trust like a program). A state dict file is loaded with `weights_only=True`. Non-finite weights
    are refused, naming the tensors.

    The architecture is read from the tensors as OpenAI's `build_model` does; head counts are width / 64 (OpenAI's
    rule) unless given. Start CLIP-RC training from it with
    `CLIPRCForSemanticSegmentation.from_clip(load_openai_clip("ViT-B-16.pt"), config, processor=processor)`.
    """
    state, origin = _read_openai_state(path_or_state_dict, trust_torchscript)
    _refuse_non_finite(state, origin)
    state = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    if "visual.proj" not in state and any(name.startswith("visual.layer1.") for name in state):
        raise CheckpointConversionError(f"{origin} is a ResNet CLIP; only ViT image towers are supported.")
    reader = _Reader(state, origin)
    vision = _read_tower(reader, "visual.", "ln_post.weight")
    text = _read_tower(reader, "", "ln_final.weight")
    conv = reader.shape("visual.conv1.weight")
    positions = reader.shape("visual.positional_embedding")
    projection = reader.shape("text_projection")
    tokens = reader.shape("token_embedding.weight")
    text_positions = reader.shape("positional_embedding")
    reader.check()
    grid = _square_root(positions[0] - 1, "the number of patch position rows", origin)
    vocab_size = tokens[0]
    vision.update(
        patch_size=conv[-1],
        image_size=grid * conv[-1],
        num_channels=conv[1],
        num_attention_heads=vision_num_heads or _openai_heads(vision["hidden_size"], "vision", origin),
    )
    text.update(
        vocab_size=vocab_size,
        max_position_embeddings=text_positions[0],
        num_attention_heads=text_num_heads or _openai_heads(text["hidden_size"], "text", origin),
        # The end-of-text token is the highest id, the start token the one before (49407 / 49406 for OpenAI's BPE).
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        pad_token_id=min(1, vocab_size - 1),
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection[1])
    hub_state = openai_to_hub_state_dict(state, config, origin)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(hub_state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"Internal mapping error: missing {missing}, unexpected {unexpected}.")
    return model.eval()


def _openai_heads(width: int, tower: str, origin: str) -> int:
    if width % 64:
        raise CheckpointConversionError(
            f"{origin}: the {tower} tower is {width} wide, not a multiple of 64, so OpenAI's heads = width / 64 rule "
            f"does not apply; pass {tower}_num_heads."
        )
    return width // 64


# ---- writing a model folder ----------------------------------------------------------------------------------------


def save_converted(model: CLIPRCForSemanticSegmentation, output_dir, tokenizer=None) -> Path:
    """Write `model` (safetensors, config, code for trust_remote_code) and its processor (the image processor of its
    config, with the tokenizer when given), atomically."""
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    with atomic_output_dir(output_dir) as folder:
        model.save_pretrained(folder)
        if tokenizer is None:
            image_processor.save_pretrained(folder)
        else:
            CLIPRCProcessor(image_processor, tokenizer, templates=model.config.prompt_templates).save_pretrained(
                folder
            )
    return Path(output_dir)


# ---- command line --------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rc-convert",
        description=(
            "Convert a CLIP-RC checkpoint of the reference implementation (mmsegmentation .pth) into a transformers "
            "model folder, or, with --to-original, a model folder of this library into a reference checkpoint."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, help="Reference .pth file (or, with --to-original, a model folder)."
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        dest="output_dir",
        required=True,
        help="Model folder to write (replaced atomically). With --to-original: a .pth file, or a folder that receives "
        "model.pth.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, help="Recipe giving class names, split, setting and templates.")
    source.add_argument("--config", help="A CLIPRCConfig (config.json or a folder holding one); shapes are checked.")
    parser.add_argument(
        "--tokenizer", help="Local CLIP tokenizer folder: class embeddings are computed and it is saved."
    )
    parser.add_argument(
        "--class-embeddings", help="A (C, E) .npy (the reference's text embedding file) or tensor file."
    )
    parser.add_argument(
        "--vision-heads", type=int, help="Image tower attention heads (default: preset, or width / 64)."
    )
    parser.add_argument("--text-heads", type=int, help="Text tower attention heads (default: preset, or width / 64).")
    parser.add_argument("--decoder-heads", type=int, help="Decoder attention heads (default: the preset's 8).")
    parser.add_argument(
        "--to-original", action="store_true", help="Convert this library's folder to the reference layout."
    )
    parser.add_argument(
        "--no-unused-weights",
        action="store_true",
        help="With --to-original: omit the zero-filled decoder self_attn / norm1 tensors the reference never uses.",
    )
    return parser


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def main(argv: list[str] | None = None) -> int:
    """`clip-rc-convert`: see `--help`. Returns the exit status (0 on success)."""
    args = _build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.to_original:
            return _main_to_original(args)
        return _main_from_original(args)
    except (CheckpointConversionError, FileNotFoundError, FileExistsError, ValueError, OSError) as error:
        sys.stderr.write(f"clip-rc-convert: error: {error}\n")
        return 1


def _main_from_original(args) -> int:
    config = load_clip_rc_config(args.config) if args.config else None
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    heads = {
        "vision_num_heads": args.vision_heads,
        "text_num_heads": args.text_heads,
        "decoder_num_heads": args.decoder_heads,
    }
    if config is not None and any(value is not None for value in heads.values()):
        raise ValueError("--vision-heads / --text-heads / --decoder-heads apply to --preset only; edit the config.")
    model, summary = _convert_original(
        args.checkpoint,
        config,
        tokenizer,
        preset=None if config is not None else (args.preset or "voc-inductive"),
        class_embeddings=args.class_embeddings,
        **({} if config is not None else heads),
    )
    output = save_converted(model, args.output_dir, tokenizer)
    config = model.config
    sys.stdout.write(
        f"Converted {summary.origin} -> {output}\n"
        f"  tensors read: {summary.num_tensors}, dropped as unused: {len(summary.dropped)}\n"
        f"  crop {config.crop_size}, patch {config.vision_config.patch_size}, vision {config.vision_config.hidden_size}"
        f"x{config.vision_config.num_hidden_layers} ({config.vision_config.num_attention_heads} heads), prompts "
        f"{config.num_prompt_tokens}, regions {config.region_grid_size}x{config.region_grid_size}, decoder "
        f"{config.decoder_num_layers}+{config.recovery_num_layers} layers\n"
        f"  classes: {config.num_labels} ({config.setting}); class embeddings: {summary.class_embeddings}\n"
        f"  {'processor / tokenizer saved' if tokenizer is not None else 'no tokenizer saved'}\n"
    )
    return 0


def _main_to_original(args) -> int:
    check_model_folder(args.checkpoint)
    try:
        model = CLIPRCForSemanticSegmentation.from_pretrained(args.checkpoint, local_files_only=True)
    except ValueError as error:  # e.g. a bad value in its config.json
        raise ValueError(f"Cannot load the model folder {args.checkpoint}: {error}") from error
    missing = missing_weights(args.checkpoint, model)
    if missing:
        raise CheckpointConversionError(
            f"The weight files of {args.checkpoint} lack {len(missing)} tensors ({_listing(missing)}): converting it "
            "would write freshly initialised values."
        )
    output = Path(args.output_dir)
    if output.suffix not in (".pth", ".pt"):
        output = output / "model.pth"
    written = save_original_checkpoint(model, output, include_unused_weights=not args.no_unused_weights)
    sys.stdout.write(
        f"Wrote the reference checkpoint {written[0]}"
        + (f" and its text embeddings {written[1]}" if len(written) > 1 else " (no class embeddings set)")
        + ("" if args.no_unused_weights else "; unused decoder self_attn / norm1 tensors are zero-filled")
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
