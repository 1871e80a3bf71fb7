"""transformers' common image-processor tests (`ImageProcessingTestMixin`,
`PostProcessSemanticSegmentationTestMixin`) on `CLIPRCImageProcessor`."""

import unittest

import torch
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

from clip_rc import CLIPRCConfig, CLIPRCSemanticSegmenterOutput

from .transformers_suites import import_suite


image_processing_common = import_suite("test_image_processing_common")


class CLIPRCImageProcessingTester(image_processing_common.ImageProcessingTester):
    """Random images of 30 to 400 pixels a side, resized to fit one 32x32 sliding window (longest edge 32): the suite
    expects one `pixel_values` row per image of shape `(3, crop_height, crop_width)`."""

    def __init__(self, parent, num_labels=3, logits_size=8, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 32, "longest_edge": 32})
        kwargs.setdefault("crop_size", {"height": 32, "width": 32})
        super().__init__(parent, **kwargs)
        self.num_labels = num_labels
        self.logits_size = logits_size

    def _get_image_processing_classes(self):
        # The suite looks the classes up by the test file's folder name among transformers' own models; CLIP-RC's are
        # registered with `AutoImageProcessor` (one per backend).
        return dict(IMAGE_PROCESSOR_MAPPING[CLIPRCConfig])

    def prepare_post_process_semantic_segmentation_inputs(self):
        """What the model returns for one 32x32 window per image: window logits on the patch grid, the images' sizes
        and the calibration; the label maps then have the images' (resized) size."""
        logits = torch.randn(self.batch_size, self.num_labels, self.logits_size, self.logits_size)
        outputs = CLIPRCSemanticSegmenterOutput(
            logits=logits,
            image_sizes=torch.tensor([[32, 32]] * self.batch_size),
            score_offsets=torch.zeros(self.num_labels),
        )
        return {"outputs": outputs}, {"num_labels": self.num_labels, "height": 32, "width": 32}


class CLIPRCImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = CLIPRCImageProcessingTester

    @unittest.skip(
        reason="transformers' rule for models added to the library after 2025-09-01; a torchvision backend cannot be "
        "built or tested here (torchvision does not import beside this project's CPU build of torch)"
    )
    def test_new_models_require_torchvision_backend(self):
        pass
