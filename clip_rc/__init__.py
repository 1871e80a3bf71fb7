"""CLIP-RC (CVPR 2024) zero-shot semantic segmentation as a Hugging Face transformers model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

from .configuration_clip_rc import SETTINGS, CLIPRCConfig
from .image_processing_clip_rc import CLIPRCImageProcessor
from .modeling_clip_rc import (
    CLIPRCForSemanticSegmentation,
    CLIPRCModel,
    CLIPRCModelOutput,
    CLIPRCPreTrainedModel,
    CLIPRCSemanticSegmenterOutput,
)
from .pipelines import CLIPRCSegmentationPipeline, CLIPRCZeroShotSegmentationPipeline
from .presets import PRESETS
from .processing_clip_rc import CLIPRCProcessor


__version__ = "0.1.0"

AutoConfig.register(CLIPRCConfig.model_type, CLIPRCConfig, exist_ok=True)
AutoModel.register(CLIPRCConfig, CLIPRCModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(CLIPRCConfig, CLIPRCForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(CLIPRCConfig, image_processor_classes={"pil": CLIPRCImageProcessor}, exist_ok=True)
AutoProcessor.register(CLIPRCConfig, CLIPRCProcessor, exist_ok=True)
# Saved folders carry the code and an `auto_map`, so they load with trust_remote_code without this package.
CLIPRCConfig.register_for_auto_class()
CLIPRCModel.register_for_auto_class("AutoModel")
CLIPRCForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "CLIPRCConfig",
    "CLIPRCForSemanticSegmentation",
    "CLIPRCImageProcessor",
    "CLIPRCModel",
    "CLIPRCModelOutput",
    "CLIPRCPreTrainedModel",
    "CLIPRCProcessor",
    "CLIPRCSegmentationPipeline",
    "CLIPRCSemanticSegmenterOutput",
    "CLIPRCZeroShotSegmentationPipeline",
    "PRESETS",
    "SETTINGS",
]
