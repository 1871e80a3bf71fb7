"""
Parameter and FLOP report of a CLIP-RC configuration (`clip-rc-flops`, also `python -m clip_rc.commands.flops`).

Parameters are counted per part (image tower with its projection, prompts and region tokens; text tower with its
projection; decode head, of which the training-only recovery branch), total and trainable (the reference's frozen
set). FLOPs are counted with [`clip_rc.profiling.count_flops`] on a model built on the `meta` device (no weights are
materialised or downloaded): per crop for the image tower and the head at inference (plus the recovery
branch used in training), and per class prompt for the text tower. FlopCounterMode counts a multiply-add as 2 FLOPs
(so MACs = FLOPs / 2; mmcv's `get_flops.py`, used by the reference, reports MACs under the name "FLOPs") and counts
matrix products, convolutions and attention only (no norms, activations, softmax).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..configuration_clip_rc import CLIPRCConfig
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
from ..presets import PRESETS
from ..profiling import count_flops
from ..utils import load_clip_rc_config, write_json_atomic


__all__ = ["count_parameters", "flop_breakdown", "flop_report", "format_report", "main_flops"]


def _parameter_counts(parameters) -> dict[str, int]:
    parameters = list(parameters)
    return {
        "total": sum(parameter.numel() for parameter in parameters),
        "trainable": sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
    }


def count_parameters(model: CLIPRCForSemanticSegmentation) -> dict[str, dict[str, int]]:
    """`{"vision" | "text" | "head" | "head_recovery" | "total": {"total": n, "trainable": n}}`; `head` includes the
    recovery branch, which `head_recovery` counts alone."""
    return {
        "vision": _parameter_counts(
            [*model.clip_rc.vision_model.parameters(), *model.clip_rc.visual_projection.parameters()]
        ),
        "text": _parameter_counts(
            [*model.clip_rc.text_model.parameters(), *model.clip_rc.text_projection.parameters()]
        ),
        "head": _parameter_counts(model.decode_head.parameters()),
        "head_recovery": _parameter_counts(model.decode_head.recovery.parameters()),
        "total": _parameter_counts(model.parameters()),
    }


def _flops(function) -> int:
    with torch.no_grad():
        return count_flops(function)


def flop_breakdown(
    model: CLIPRCForSemanticSegmentation, image_size: int | None = None, num_classes: int | None = None
) -> dict[str, int]:
    """
    FLOPs of one square crop of `image_size` (default: the config's crop) with `num_classes` classes (default: the
    config's), on whatever device the model is (the `meta` device works and allocates nothing).

    Returns:
        `vision` (image tower per crop), `head` (decode head per crop at inference), `head_recovery` (the recovery
        branch, training only), `per_crop` (= vision + head), `text_per_prompt` (text tower on one prompt of the
        full context length, as the reference pads), `text_all_classes` (every class x template, computed once per
        class list, not per crop).
    """
    config = model.config
    image_size = image_size or config.crop_size
    num_classes = num_classes or config.num_labels
    device = next(model.parameters()).device
    model.eval()
    pixel_values = torch.zeros(1, 3, image_size, image_size, device=device)
    text_embeds = torch.zeros(num_classes, config.projection_dim, device=device)
    if device.type != "meta":
        pixel_values.normal_()
        text_embeds.normal_()
        text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)

    features = {}

    def vision():
        features["image"] = model.clip_rc(pixel_values)

    vision_flops = _flops(vision)
    head_flops = _flops(lambda: model.decode_head(features["image"], text_embeds))
    head_training_flops = _flops(lambda: model.decode_head(features["image"], text_embeds, compute_recovery=True))

    context = config.text_config.max_position_embeddings
    input_ids = torch.zeros(1, context, dtype=torch.long, device=device)
    eos = config.text_config.eos_token_id
    if device.type != "meta" and eos is not None:
        input_ids[0, -1] = eos
    text_flops = _flops(lambda: model.clip_rc.get_text_features(input_ids))
    num_prompts = num_classes * len(config.prompt_templates)
    return {
        "vision": vision_flops,
        "head": head_flops,
        "head_recovery": head_training_flops - head_flops,
        "per_crop": vision_flops + head_flops,
        "text_per_prompt": text_flops,
        "text_all_classes": text_flops * num_prompts,
    }


def _resolve_config(config_or_name) -> CLIPRCConfig:
    if isinstance(config_or_name, CLIPRCConfig):
        return config_or_name
    name = str(config_or_name)
    if name in PRESETS:
        return CLIPRCConfig.from_preset(name)
    if Path(name).exists():
        return load_clip_rc_config(name)
    raise ValueError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a config file or model folder.")


def flop_report(
    config_or_name: CLIPRCConfig | str,
    image_size: int | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "meta",
) -> dict:
    """Parameters and FLOPs of a configuration (a `CLIPRCConfig`, a preset name, a config.json or a model folder),
    built on `device` (default `meta`: nothing is allocated, no weights are needed)."""
    config = _resolve_config(config_or_name)
    with torch.device(device):
        model = CLIPRCForSemanticSegmentation(config)
    image_size = image_size or config.crop_size
    num_classes = num_classes or config.num_labels
    return {
        "image_size": image_size,
        "num_classes": num_classes,
        "num_templates": len(config.prompt_templates),
        "parameters": count_parameters(model),
        "flops": flop_breakdown(model, image_size, num_classes),
    }


def _millions(value: int) -> str:
    return f"{value / 1e6:10.2f} M"


def _giga(value: int) -> str:
    return f"{value / 1e9:10.2f} GFLOPs"


def format_report(report: dict) -> str:
    parameters, flops = report["parameters"], report["flops"]
    lines = [
        f"CLIP-RC at {report['image_size']}x{report['image_size']}, {report['num_classes']} classes "
        f"x {report['num_templates']} template(s)",
        "Parameters                 total        trainable",
    ]
    labels = {
        "vision": "image tower",
        "text": "text tower",
        "head": "decode head",
        "head_recovery": "  of which recovery",
        "total": "total",
    }
    for key, label in labels.items():
        lines.append(f"  {label:<20}{_millions(parameters[key]['total'])}  {_millions(parameters[key]['trainable'])}")
    lines += [
        "FLOPs (FlopCounterMode: 2 per multiply-add; MACs = FLOPs / 2)",
        f"  image tower per crop    {_giga(flops['vision'])}",
        f"  decode head per crop    {_giga(flops['head'])}",
        f"  inference per crop      {_giga(flops['per_crop'])}",
        f"  recovery (training)     {_giga(flops['head_recovery'])}",
        f"  text tower per prompt   {_giga(flops['text_per_prompt'])}",
        f"  text, all class prompts {_giga(flops['text_all_classes'])}  (once per class list)",
    ]
    return "\n".join(lines) + "\n"


def main_flops(argv: list[str] | None = None) -> int:
    """`clip-rc-flops CONFIG [--image-size S] [--num-classes C] [--json FILE]`; CONFIG is a preset name, a
    config.json or a saved model folder."""
    parser = argparse.ArgumentParser(prog="clip-rc-flops", description=main_flops.__doc__)
    parser.add_argument("config", help=f"Preset ({', '.join(PRESETS)}), config.json or model folder.")
    parser.add_argument("--image-size", type=int, help="Side of the square crop (default: the config's crop size).")
    parser.add_argument("--num-classes", type=int, help="Classes given to the head (default: the config's).")
    parser.add_argument("--json", help="Also write the report as JSON to this file.")
    args = parser.parse_args(argv)
    try:
        report = flop_report(args.config, args.image_size, args.num_classes)
    except (ValueError, OSError) as error:
        sys.stderr.write(f"clip-rc-flops: error: {error}\n")
        return 1
    sys.stdout.write(format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


main = main_flops

if __name__ == "__main__":
    sys.exit(main_flops())
