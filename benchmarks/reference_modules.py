"""
The authors' CLIP-RC modules (`uyzhang/CLIP-RC`) built on CPU without mmcv, mmseg, timm or torchvision, for the
side-by-side speed run (`side_by_side.py`).

Nothing of the reference is kept in this project: its `models/` folder is exported from a git directory of the
reference (`CLIP_RC_MIRROR`, a clone or a bare mirror) into a cache folder named after the commit, and imported from
there. This module only provides stand-ins for the names the reference imports from those packages: registries
that record the decorated classes, a minimal decode-head base class, `resize`, `force_fp32`, `add_prefix`,
`accuracy`, and timm's `drop_path` / `trunc_normal_`.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


MIRROR_VARIABLE = "CLIP_RC_MIRROR"

# The reference's ViT-B/16 image tower and decode head as its CLIP-RC configs build them (512 crops).
REFERENCE_IMAGE_TOWER = {
    "input_resolution": 512, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "output_dim": 512,
    "get_embeddings": True, "drop_path_rate": 0.1, "out_indices": [11], "prompt_dim": 768, "total_d_layer": 11,
    "region_level_bridge_size": 16,
}  # fmt: skip
REFERENCE_DECODE_HEAD = {
    "img_size": 512, "in_channels": 512, "channels": 512, "embed_dims": 512, "num_layers": 3, "num_heads": 8,
    "use_stages": 1, "use_proj": False,
}  # fmt: skip


class MissingReferenceError(RuntimeError):
    """The reference source is not available (no or an unusable `CLIP_RC_MIRROR`)."""


def reference_git_dir() -> Path:
    """The git directory `CLIP_RC_MIRROR` names; `MissingReferenceError` saying what to set when it is unusable."""
    mirror = os.environ.get(MIRROR_VARIABLE)
    if not mirror:
        raise MissingReferenceError(
            f"{MIRROR_VARIABLE} is not set: point it at a git directory (clone or bare mirror) of uyzhang/CLIP-RC."
        )
    path = Path(mirror)
    if not path.is_dir():
        raise MissingReferenceError(f"{MIRROR_VARIABLE}={mirror} is not a folder.")
    return path


def _git(git_dir: Path, *args: str) -> bytes:
    result = subprocess.run(["git", f"--git-dir={_git_metadata_dir(git_dir)}", *args], capture_output=True)
    if result.returncode:
        raise MissingReferenceError(
            f"git {' '.join(args)} failed in {git_dir}: {result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout


def _git_metadata_dir(git_dir: Path) -> Path:
    """`.git` of a clone, the folder itself for a bare repository."""
    return git_dir / ".git" if (git_dir / ".git").is_dir() else git_dir


def reference_commit(git_dir: Path) -> str:
    return _git(git_dir, "rev-parse", "HEAD").decode().strip()


def export_reference_models(git_dir: Path) -> Path:
    """The reference's `models/` folder at HEAD, exported once per commit into a cache folder (written beside and
    renamed into place, so a half-exported tree is never used). Returns the folder that holds `models/`."""
    commit = reference_commit(git_dir)
    cache_root = Path(tempfile.gettempdir()) / "clip_rc_reference"
    tree = cache_root / commit
    if (tree / "models").is_dir():
        return tree
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{commit[:12]}-"))
    try:
        archive = _git(git_dir, "archive", "--format=tar", commit, "models")
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        # The package's own __init__ imports the segmentor and the datasets, which need the real mmseg.
        (staging / "models" / "__init__.py").write_text("")
        os.replace(staging, tree)
    except OSError:
        if not (tree / "models").is_dir():  # another process may have won the race; anything else is an error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


class _Registry:
    """What the reference uses of an mmcv registry: a decorator recording classes, and `build(dict(type=...))`."""

    def __init__(self):
        self.classes = {}

    def register_module(self, *args, **kwargs):
        def register(cls):
            self.classes[cls.__name__] = cls
            return cls

        return register

    def build(self, spec: dict):
        spec = dict(spec)
        return self.classes[spec.pop("type")](**spec)


class _DecodeHeadBase(nn.Module):
    """The attributes the reference's decode head reads from mmseg's `BaseDecodeHead`."""

    losses_registry: _Registry

    def __init__(self, in_channels, channels, *, num_classes, loss_decode=None, ignore_index=255,
                 align_corners=False, **unused):  # fmt: skip
        super().__init__()
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.ignore_index, self.align_corners = ignore_index, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # deleted by the reference head
        self.loss_decode = self.losses_registry.build(loss_decode)


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample, as timm's `drop_path`."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _register_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def install_import_stand_ins():
    """Put the stand-ins for mmseg, mmcv and timm into `sys.modules` (once)."""
    if "mmseg" in sys.modules:
        return
    registries = {name: _Registry() for name in ("BACKBONES", "HEADS", "LOSSES", "SEGMENTORS", "DATASETS")}
    builders = {**registries, "build_backbone": registries["BACKBONES"].build, "build_head": registries["HEADS"].build}
    _DecodeHeadBase.losses_registry = registries["LOSSES"]

    def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
        return F.interpolate(input, size, scale_factor, mode, align_corners)

    _register_module("mmseg")
    _register_module("mmseg.models", builder=types.SimpleNamespace(**builders))
    _register_module("mmseg.models.builder", **builders)
    _register_module("mmseg.models.losses", accuracy=lambda *args, **kwargs: torch.tensor(0.0))
    _register_module("mmseg.models.decode_heads")
    _register_module("mmseg.models.decode_heads.decode_head", BaseDecodeHead=_DecodeHeadBase)
    _register_module("mmseg.models.segmentors")
    _register_module("mmseg.models.segmentors.encoder_decoder", EncoderDecoder=nn.Module)
    _register_module("mmseg.core", add_prefix=lambda values, prefix: {f"{prefix}.{k}": v for k, v in values.items()})
    _register_module("mmseg.ops", resize=resize)
    _register_module("mmcv")
    _register_module("mmcv.runner", force_fp32=lambda **kwargs: lambda function: function)
    _register_module("timm")
    _register_module("timm.models")
    _register_module("timm.models.layers", drop_path=_drop_path, trunc_normal_=nn.init.trunc_normal_)


def _with_torchvision_stand_in(import_modules: Callable):
    """Run `import_modules` with an empty `torchvision` importable (the reference's loss helpers import it at module
    level and use none of it), then remove it again so that transformers never sees it."""
    if "torchvision" in sys.modules:
        return import_modules()
    stand_in = _register_module("torchvision", _is_tracing=lambda: False)
    try:
        return import_modules()
    finally:
        if sys.modules.get("torchvision") is stand_in:
            del sys.modules["torchvision"]


def import_reference_classes() -> tuple[type, type]:
    """The reference's image tower (`CLIPVisionTransformerWithRLB`) and decode head (`ATMSingleHeadSeg`) classes;
    its `SegLoss` is registered on the way."""
    tree = export_reference_models(reference_git_dir())
    install_import_stand_ins()
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))

    def import_modules():
        from models.backbone.img_encoder_rlb import CLIPVisionTransformerWithRLB
        from models.decode_heads.decode_seg import ATMSingleHeadSeg
        from models.losses.seg_loss import SegLoss  # noqa: F401  (registers the loss the head builds)

        return CLIPVisionTransformerWithRLB, ATMSingleHeadSeg

    return _with_torchvision_stand_in(import_modules)


def build_reference_model(
    num_prompt_tokens: int,
    seen_class_ids: list[int],
    all_class_ids: list[int],
    loss_weights: tuple[float, float, float],
) -> tuple[nn.Module, nn.Module]:
    """The reference's image tower and decode head at full size with random weights (the head initialised as the
    reference initialises it). `loss_weights` are (mask, dice, recovery)."""
    image_tower_class, decode_head_class = import_reference_classes()
    image_tower = image_tower_class(num_tokens=num_prompt_tokens, **REFERENCE_IMAGE_TOWER)
    mask_weight, dice_weight, recovery_weight = loss_weights
    loss = {
        "type": "SegLoss", "dec_layers": REFERENCE_DECODE_HEAD["num_layers"], "mask_weight": mask_weight,
        "dice_weight": dice_weight, "loss_weight": 1.0, "recovery_loss_weight": recovery_weight,
    }  # fmt: skip
    decode_head = decode_head_class(
        seen_idx=list(seen_class_ids), all_idx=list(all_class_ids), num_classes=len(seen_class_ids),
        loss_decode=loss, **REFERENCE_DECODE_HEAD,
    )  # fmt: skip
    decode_head.init_weights()
    return image_tower, decode_head
