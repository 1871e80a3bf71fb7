"""transformers' common model and configuration tests (`ModelTesterMixin`, `ConfigTester`) on a tiny CLIP-RC, the way
transformers tests its own vision models (e.g. `tests/models/segformer/test_modeling_segformer.py`)."""

import inspect
import unittest
from unittest import mock

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

import clip_rc
from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation

from .conftest import tiny_config
from .transformers_suites import import_suite


configuration_common = import_suite("test_configuration_common")
modeling_common = import_suite("test_modeling_common")

# `CLIPRCModel` (the base model behind `AutoModel`) is tested as soon as the package provides it.
MODEL_CLASSES = tuple(
    model_class
    for model_class in (getattr(clip_rc, "CLIPRCModel", None), CLIPRCForSemanticSegmentation)
    if model_class is not None
)


class CLIPRCModelTester:
    """The tiny configuration and inputs every test of this module uses: 32x32 crops of 8x8 patches (a 4x4 grid cut
    into 2x2 regions), 3 prompt tokens, 2-layer towers of width 32, 3 classes."""

    def __init__(self, parent, batch_size=2, crop_size=32, text_length=7, is_training=True):
        self.parent = parent
        # `test_batching_equivalence` splits every input whose first axis is a multiple of the batch size; the class
        # prompts are not a batch axis, so their count (3) is kept prime to the batch size (2).
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.text_length = text_length
        self.is_training = is_training
        config = self.get_config()
        vision_config = config.vision_config
        self.num_channels = vision_config.num_channels
        self.num_labels = config.num_labels
        self.hidden_size = vision_config.hidden_size
        self.num_hidden_layers = vision_config.num_hidden_layers
        self.num_attention_heads = vision_config.num_attention_heads
        self.vision_config = vision_config.to_dict()
        self.text_config = config.text_config.to_dict()
        self.grid_size = crop_size // vision_config.patch_size
        # The image tower's tokens: class, prompts, patches, region tokens.
        self.seq_length = 1 + config.num_prompt_tokens + self.grid_size**2 + config.num_region_tokens

    def get_config(self) -> CLIPRCConfig:
        return tiny_config(crop_size=self.crop_size, sliding_window_stride=self.crop_size * 3 // 4)

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = modeling_common.floats_tensor(
            [self.batch_size, self.num_channels, self.crop_size, self.crop_size]
        )
        # One tokenised prompt per class, ending with the end-of-text token CLIP pools.
        text_config = config.text_config
        input_ids = modeling_common.ids_tensor([self.num_labels, self.text_length], text_config.vocab_size - 2)
        input_ids[:, -1] = text_config.eos_token_id
        attention_mask = torch.ones_like(input_ids)
        return config, pixel_values, input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}

    def create_and_check_for_semantic_segmentation(self, config, pixel_values, input_ids, attention_mask):
        model = CLIPRCForSemanticSegmentation(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        self.parent.assertEqual(
            result.logits.shape, (self.batch_size, self.num_labels, self.grid_size, self.grid_size)
        )
        labels = modeling_common.ids_tensor([self.batch_size, self.crop_size, self.crop_size], self.num_labels)
        with torch.no_grad():
            result = model(pixel_values, labels=labels, input_ids=input_ids, attention_mask=attention_mask)
        self.parent.assertGreater(result.loss.item(), 0.0)


class CLIPRCModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = MODEL_CLASSES
    # Inputs the attention-implementation tests pass besides `pixel_values` (with `attention_mask`): the class prompts.
    additional_model_inputs = ["input_ids"]
    # CLIP-RC's text tower reads token ids only (no `inputs_embeds`) and its vocabulary is CLIP's.
    test_resize_embeddings = False
    # Vision and text sub-configs, as CLIP's: the attention-implementation tests treat the model as composite.
    _is_composite = True
    # The suite runs this check only for models it finds added in 2023 or later (by a copyright year in the config's
    # file, which ours does not carry); CLIP-RC is a 2024 model.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = CLIPRCModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self,
            config_class=CLIPRCConfig,
            has_text_modality=False,
            common_properties=["projection_dim", "crop_size", "num_prompt_tokens", "region_grid_size"],
            projection_dim=24,
            crop_size=64,
            sliding_window_stride=48,
        )
        # The suites recognise base models and segmentation heads by the class names in transformers' auto-mapping
        # tables (to add segmentation labels, to skip training a base model...). CLIP-RC ships outside
        # transformers, so its classes are declared there, as a built-in model's are, for the length of a test.
        base_model_names = {CLIPRCConfig.model_type: "CLIPRCModel"} if len(MODEL_CLASSES) > 1 else {}
        for table, names in (
            (modeling_auto.MODEL_MAPPING_NAMES, base_model_names),
            (
                modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
                {CLIPRCConfig.model_type: CLIPRCForSemanticSegmentation.__name__},
            ),
        ):
            patcher = mock.patch.dict(table, names)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_for_semantic_segmentation(self):
        self.model_tester.create_and_check_for_semantic_segmentation(*self.model_tester.prepare_config_and_inputs())

    def test_forward_signature(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            arguments = list(inspect.signature(model_class(config).forward).parameters)
            self.assertListEqual(arguments[:1], ["pixel_values"])
