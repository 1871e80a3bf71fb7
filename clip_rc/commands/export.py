"""Export a CLIP-RC model through transformers' exporters (`transformers.exporters`): `clip-rc-export`.

```bash
clip-rc-export --model runs/voc-inductive --format onnx --output_dir exported/voc-inductive-onnx
clip-rc-export --model runs/voc-inductive --format torch --output_dir exported/voc-inductive-torch
```

The output folder holds two graphs, exported with dynamic shapes so that any number of crops, classes and prompts,
and any image size that is a multiple of `patch_size * region_grid_size`, run through them:

- `model.onnx` (with its weights in `model.onnx.data`) or `model.pt2`: the segmentation model,
  `pixel_values (num_crops, 3, height, width)` and `text_embeds (C, E)` in, `logits (num_crops, C, height / patch,
  width / patch)`, `score_offsets (C,)` and `image_sizes (num_crops, 2)` out, as [`CLIPRCForSemanticSegmentation`]
  returns them;
- `text_model.onnx` or `text_model.pt2`: the text tower, tokenized class prompts `input_ids` / `attention_mask`
  `(C, T, L)` in, normalised class embeddings `text_embeds (C, E)` out, so class names chosen at deployment are
  encoded by the exported model too;

and beside them transformers' export manifest (`export.json`), the model config, the processor (image processor
and tokenizer: the same pre- and post-processing serves the export) and `class_embeddings.safetensors`, the
checkpoint's class embeddings with the score offsets the model applies to them (the default classes of the export).
[`clip_rc.exported_model.CLIPRCExportedModel`] runs such a folder. The folder is written atomically; an existing
non-empty folder is only replaced with `--overwrite`.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim
from transformers.exporters import AutoHfExporter, DynamoConfig, ExportedModel, OnnxConfig

from ..configuration_clip_rc import CLIPRCConfig
from ..exported_model import (
    CLASS_EMBEDDINGS_FILE,
    EXPORT_FORMATS,
    SEGMENTATION_COMPONENT,
    TEXT_COMPONENT,
    CLIPRCTextEncoderOutput,
    image_size_multiple,
)
from ..inference import load_model_and_processor
from ..modeling_clip_rc import CLIPRCForSemanticSegmentation, CLIPRCModel
from ..processing_clip_rc import CLIPRCProcessor
from ..utils import atomic_output_dir, setup_logging


logger = logging.getLogger("clip_rc.commands.export")

__all__ = [
    "CLASS_EMBEDDINGS_FILE",
    "EXPORT_FORMATS",
    "SEGMENTATION_COMPONENT",
    "TEXT_COMPONENT",
    "CLIPRCTextEncoder",
    "export_model",
    "export_segmentation_model",
    "export_text_tower",
    "image_size_multiple",
    "main",
    "save_export",
]


class CLIPRCTextEncoder(nn.Module):
    """The text tower as it is deployed: tokenized class prompts in, normalised class embeddings out
    ([`CLIPRCModel.encode_class_prompts`]), as a module of its own so that it exports as a graph of its own."""

    def __init__(self, model: CLIPRCModel):
        super().__init__()
        self.clip_rc = model

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> CLIPRCTextEncoderOutput:
        """`input_ids` and `attention_mask` of shape `(C, T, L)`, as [`CLIPRCProcessor`] returns them."""
        return CLIPRCTextEncoderOutput(text_embeds=self.clip_rc.encode_class_prompts(input_ids, attention_mask))


def segmentation_dynamic_shapes(config: CLIPRCConfig) -> dict:
    multiple = image_size_multiple(config)
    return {
        "pixel_values": {
            0: Dim("num_crops", min=1),
            2: multiple * Dim("cells_high", min=1),
            3: multiple * Dim("cells_wide", min=1),
        },
        "text_embeds": {0: Dim("num_classes", min=1)},
    }


def text_dynamic_shapes() -> dict:
    # The prompt length stays the traced one: the processor pads every prompt to the tokenizer's length.
    num_classes, num_templates = Dim("num_classes", min=1), Dim("num_templates", min=1)
    return {
        "input_ids": {0: num_classes, 1: num_templates},
        "attention_mask": {0: num_classes, 1: num_templates},
    }


def _export_config(export_format: str, dynamic_shapes: dict) -> DynamoConfig:
    config_class = OnnxConfig if export_format == "onnx" else DynamoConfig
    return config_class(dynamic_shapes=dynamic_shapes)


def export_segmentation_model(model: CLIPRCForSemanticSegmentation, export_format: str) -> ExportedModel:
    """The segmentation model exported through transformers' exporter for `export_format` (`"dynamo"`:
    `torch.export`, `"onnx"`: ONNX): `pixel_values` and `text_embeds` in, with dynamic crops, image size and classes.

    Returns:
        `transformers.exporters.ExportedModel` with the one component `"model"`.
    """
    config, crop = model.config, model.config.crop_size
    sample_inputs = {
        "pixel_values": torch.zeros(2, 3, crop, crop, device=model.class_embeddings.device),
        "text_embeds": model.class_embeddings.clone(),
    }
    export_config = _export_config(export_format, segmentation_dynamic_shapes(config))
    logger.info(
        f"Exporting the segmentation model ({export_format}, crop {crop}, sides multiples of {image_size_multiple(config)})"
    )
    return AutoHfExporter.from_config(export_config).export(model.eval(), sample_inputs, export_config)


def export_text_tower(
    model: CLIPRCForSemanticSegmentation, processor: CLIPRCProcessor, export_format: str
) -> ExportedModel:
    """The text tower ([`CLIPRCTextEncoder`]) exported like [`export_segmentation_model`], traced on the config's
    class prompts, with dynamic numbers of classes and templates."""
    config = model.config
    prompts = processor.tokenize_class_names(config.class_names, config.prompt_templates, return_tensors="pt")
    sample_inputs = {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]}
    export_config = _export_config(export_format, text_dynamic_shapes())
    logger.info(f"Exporting the text tower ({export_format}, prompts of {prompts['input_ids'].shape[-1]} tokens)")
    # Size-oblivious shapes: otherwise the reshape of the prompts to one row each guards on `num_templates != 1`,
    # which the traced sample satisfies and a single-template call would then fail.
    with fx_config.patch(backed_size_oblivious=True):
        return AutoHfExporter.from_config(export_config).export(
            CLIPRCTextEncoder(model.clip_rc).eval(), sample_inputs, export_config
        )


def export_model(
    model: CLIPRCForSemanticSegmentation, processor: CLIPRCProcessor, export_format: str
) -> ExportedModel:
    """
    Export the segmentation model and its text tower (see [`export_segmentation_model`], [`export_text_tower`]).

    Returns:
        `transformers.exporters.ExportedModel` with the components `"model"` and `"text_model"`, and the model config.
    """
    segmentation = export_segmentation_model(model, export_format)
    text = export_text_tower(model, processor, export_format)
    components = {SEGMENTATION_COMPONENT: segmentation.components["model"], TEXT_COMPONENT: text.components["model"]}
    return ExportedModel(components, segmentation.export_format, config=model.config)


@torch.no_grad()
def default_classes(model: CLIPRCForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """The checkpoint's class embeddings and the score offsets the model gives them (its calibration of the seen
    classes), as its forward pass computes them for its own classes."""
    class_embeddings = model.class_embeddings.detach()
    num_classes, device = class_embeddings.shape[0], class_embeddings.device
    offsets = model.score_offsets(torch.arange(num_classes, device=device), num_classes, device)
    return {
        "class_embeddings": class_embeddings.float().cpu().contiguous(),
        "score_offsets": offsets.float().cpu().contiguous(),
    }


def save_export(
    exported: ExportedModel,
    processor: CLIPRCProcessor,
    classes: dict[str, torch.Tensor],
    output_dir: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write the export, its processor and default classes to `output_dir` atomically (see `atomic_output_dir`);
    with `overwrite`, whatever the folder held is replaced."""
    with atomic_output_dir(output_dir, replace_other_files=overwrite) as folder:
        exported.save_pretrained(folder)
        processor.save_pretrained(folder)
        save_file(classes, str(Path(folder) / CLASS_EMBEDDINGS_FILE))
    return Path(output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rc-export",
        description="Export a CLIP-RC model (segmentation graph and text tower) to torch.export or ONNX.",
    )
    parser.add_argument("--model", required=True, help="Folder (or Hub id) of a CLIP-RC model.")
    parser.add_argument(
        "--processor", default=None, help="Folder or Hub id of the processor / tokenizer (default: --model)."
    )
    parser.add_argument(
        "--format", required=True, choices=sorted(EXPORT_FORMATS), help="torch: torch.export (.pt2); onnx: ONNX."
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write the export to.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty existing output folder.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model's own code from the Hub.")
    return parser


def check_output_dir(output_dir: str | Path, overwrite: bool):
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--output_dir {output_dir} exists and is not empty (pass --overwrite to replace it).")


def load_for_export(args: argparse.Namespace) -> tuple[CLIPRCForSemanticSegmentation, CLIPRCProcessor]:
    model, image_processor, tokenizer = load_model_and_processor(
        args.model, args.processor, trust_remote_code=args.trust_remote_code, device="cpu"
    )
    if tokenizer is None:
        source = args.processor or args.model
        raise ValueError(f"No tokenizer found at {source}: the text tower's export needs it (pass --processor).")
    return model, CLIPRCProcessor(image_processor, tokenizer, templates=model.config.prompt_templates)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-rc-export`: 0 when the folder was written, 1 otherwise (nothing is left half-written)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        check_output_dir(args.output_dir, args.overwrite)
        model, processor = load_for_export(args)
        exported = export_model(model, processor, EXPORT_FORMATS[args.format])
        save_export(exported, processor, default_classes(model), args.output_dir, overwrite=args.overwrite)
    except (FileExistsError, ValueError, OSError) as error:
        logger.error(str(error))
        return 1
    logger.info(f"Wrote the {args.format} export to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
