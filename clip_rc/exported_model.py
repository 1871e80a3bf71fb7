"""Running a `clip-rc-export` folder: ONNX Runtime for an ONNX export, torch for a `torch.export` program.

[`CLIPRCExportedModel`] is called like [`CLIPRCForSemanticSegmentation`] at inference (`pixel_values`,
`image_sizes`, `text_embeds` in; an output with `logits`, `score_offsets`, `image_sizes` out) and encodes class
prompts like its base model (`model.clip_rc.encode_class_prompts`), so the one inference path serves it unchanged:

```python
>>> from clip_rc.exported_model import load_exported_model_and_processor
>>> from clip_rc.inference import encode_class_names, segment_images
>>> model, image_processor, tokenizer = load_exported_model_and_processor("exported/voc-inductive-onnx")
>>> label_maps = segment_images(model, image_processor, images)  # the checkpoint's classes
>>> text_embeds = encode_class_names(model, image_processor, tokenizer, ["cat", "dog", "grass"])
>>> label_maps = segment_images(model, image_processor, images, text_embeds=text_embeds)
```
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.exporters import ExportedModel
from transformers.exporters.base import EXPORT_MANIFEST_FILE
from transformers.utils import ModelOutput

from .image_processing_clip_rc import CLIPRCImageProcessor
from .modeling_clip_rc import CLIPRCSemanticSegmenterOutput


__all__ = [
    "CLIPRCExportedModel",
    "CLIPRCExportedTextTower",
    "CLIPRCTextEncoderOutput",
    "export_format_of",
    "load_exported_model_and_processor",
]


@dataclass
class CLIPRCTextEncoderOutput(ModelOutput):
    """
    Output of the exported text tower; defined here, with the runtime, because loading an export rebuilds its
    output type by this module's name.

    Args:
        text_embeds (`torch.FloatTensor` of shape `(C, E)`): normalised class embeddings, template-averaged.
    """

    text_embeds: torch.FloatTensor | None = None


def export_format_of(export_dir: str | os.PathLike) -> str:
    """The format of a `clip-rc-export` folder (`"onnx"` or `"dynamo"`), read from transformers' export manifest."""
    manifest = Path(export_dir) / EXPORT_MANIFEST_FILE
    if not manifest.is_file():
        raise ValueError(
            f"{export_dir} is not an exported model: it has no {EXPORT_MANIFEST_FILE} (write one with clip-rc-export)."
        )
    return json.loads(manifest.read_text(encoding="utf-8"))["export_format"]


# The export's formats (command-line name -> transformers exporter), component names and files.
EXPORT_FORMATS = {"torch": "dynamo", "onnx": "onnx"}
SEGMENTATION_COMPONENT = "model"
TEXT_COMPONENT = "text_model"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"


def image_size_multiple(config) -> int:
    """Heights and widths the model takes are multiples of this: whole patches in every region cell."""
    return config.vision_config.patch_size * config.region_grid_size


class CLIPRCExportedTextTower:
    """The exported text tower, with the base model's `encode_class_prompts`."""

    def __init__(self, runner):
        self.runner = runner

    def encode_class_prompts(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.FloatTensor:
        """`(C, E)` normalised class embeddings of prompts `(C, T, L)` as [`CLIPRCProcessor`] tokenizes them (see
        [`CLIPRCModel.encode_class_prompts`])."""
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids must have shape (C, T, L), got {tuple(input_ids.shape)}.")
        return self.runner(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.dtype)).text_embeds


def _onnxruntime_session_options(num_threads: int | None):
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("Running an ONNX export needs onnxruntime: pip install 'clip-rc[onnx]'.") from error
    session_options = onnxruntime.SessionOptions()
    if num_threads is not None:
        session_options.intra_op_num_threads = num_threads
    return session_options


class CLIPRCExportedModel:
    """
    A CLIP-RC export on its runtime. Without `text_embeds` it segments the checkpoint's classes (their embeddings
    and score offsets are saved beside the graphs); `text_embeds` of other classes (e.g. from the exported text tower)
    get no offsets, as in the PyTorch model.

    Args:
        exported (`transformers.exporters.ExportedModel`): the loaded export, components `"model"` and `"text_model"`.
        class_embeddings (`torch.FloatTensor` of shape `(C, E)`): the checkpoint's class embeddings.
        score_offsets (`torch.FloatTensor` of shape `(C,)`): the score offsets the model gives them.
    """

    def __init__(self, exported: ExportedModel, class_embeddings: torch.Tensor, score_offsets: torch.Tensor):
        missing = {SEGMENTATION_COMPONENT, TEXT_COMPONENT} - set(exported.components)
        if missing:
            raise ValueError(f"The export has components {sorted(exported.components)}; missing {sorted(missing)}.")
        self.exported = exported
        self.config = exported.config
        self.class_embeddings = class_embeddings
        self.score_offsets = score_offsets
        self.clip_rc = CLIPRCExportedTextTower(exported.runners[TEXT_COMPONENT])

    @property
    def dtype(self) -> torch.dtype:
        return self.exported.dtype

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | os.PathLike,
        device=None,
        num_threads: int | None = None,
        trust_remote_code: bool = False,
    ) -> "CLIPRCExportedModel":
        """
        Load a `clip-rc-export` folder on its runtime. `num_threads` sizes ONNX Runtime's thread pool (default: ONNX
        Runtime's, every core of the machine). A `torch.export` folder holds pickled programs: loading it needs
        `trust_remote_code=True`; it runs with torch's threads (`torch.set_num_threads`).
        """
        runner_kwargs = {}
        if export_format_of(export_dir) == "onnx":
            runner_kwargs["session_options"] = _onnxruntime_session_options(num_threads)
        elif num_threads is not None:
            raise ValueError(
                "num_threads sizes ONNX Runtime's thread pool: a torch.export program uses torch's threads."
            )
        exported = ExportedModel.from_pretrained(
            os.fspath(export_dir), device=device, trust_remote_code=trust_remote_code, **runner_kwargs
        )
        classes = load_file(os.path.join(os.fspath(export_dir), CLASS_EMBEDDINGS_FILE))
        return cls(exported, classes["class_embeddings"], classes["score_offsets"])

    def check_pixel_values(self, pixel_values: torch.Tensor):
        """Crops the graph cannot take: not `(num_crops, 3, height, width)`, or sides not multiples of
        `patch_size * region_grid_size` (a graph would give wrong logits or fail obscurely)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (num_crops, 3, height, width), got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        multiple = image_size_multiple(self.config)
        if height % multiple or width % multiple:
            raise ValueError(
                f"pixel_values of size {height}x{width}: the exported model takes heights and widths that are "
                f"multiples of {multiple} (patch_size {self.config.vision_config.patch_size} x region_grid_size "
                f"{self.config.region_grid_size}); the image processor cuts images into crops of "
                f"{self.config.crop_size}."
            )

    @torch.no_grad()
    def __call__(
        self,
        pixel_values: torch.FloatTensor,
        image_sizes: torch.LongTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
    ) -> CLIPRCSemanticSegmenterOutput:
        """Window logits of `pixel_values` for `text_embeds` (default: the checkpoint's classes), with the
        `image_sizes` and `score_offsets` that [`CLIPRCImageProcessor.post_process_semantic_segmentation`] reads."""
        self.check_pixel_values(pixel_values)
        own_classes = text_embeds is None
        if own_classes:
            text_embeds = self.class_embeddings
        outputs = self.exported.runners[SEGMENTATION_COMPONENT](pixel_values=pixel_values, text_embeds=text_embeds)
        return CLIPRCSemanticSegmenterOutput(
            logits=outputs.logits,
            class_ids=torch.arange(text_embeds.shape[0]) if own_classes else None,
            score_offsets=self.score_offsets if own_classes else outputs.score_offsets,
            image_sizes=outputs.image_sizes if image_sizes is None else image_sizes,
        )


def load_exported_model_and_processor(
    export_dir: str | os.PathLike,
    processor_name_or_path: str | os.PathLike | None = None,
    device=None,
    num_threads: int | None = None,
    trust_remote_code: bool = False,
    export_format: str | None = None,
) -> tuple[CLIPRCExportedModel, CLIPRCImageProcessor, Any]:
    """A `clip-rc-export` folder with the image processor and tokenizer saved beside it (or at
    `processor_name_or_path`), as [`clip_rc.inference.load_model_and_processor`] returns a PyTorch model's. With
    `export_format`, a folder of another format is refused."""
    found_format = export_format_of(export_dir)
    if export_format is not None and found_format != export_format:
        command_format = next(name for name, value in EXPORT_FORMATS.items() if value == export_format)
        raise ValueError(
            f"{export_dir} holds a {found_format} export, not {export_format}: export the model with "
            f"clip-rc-export --format {command_format}."
        )
    model = CLIPRCExportedModel.from_pretrained(
        export_dir, device=device, num_threads=num_threads, trust_remote_code=trust_remote_code
    )
    source = os.fspath(processor_name_or_path if processor_name_or_path is not None else export_dir)
    return model, CLIPRCImageProcessor.from_pretrained(source), AutoTokenizer.from_pretrained(source)
