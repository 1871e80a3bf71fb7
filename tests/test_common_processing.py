"""transformers' common processor tests (`ProcessorTesterMixin`) on `CLIPRCProcessor`, with a tiny CLIP tokenizer."""

import unittest

from clip_rc import CLIPRCImageProcessor, CLIPRCProcessor

from .random_clip import build_test_tokenizer
from .transformers_suites import import_suite


processing_common = import_suite("test_processing_common")


class CLIPRCProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = CLIPRCProcessor

    @staticmethod
    def prepare_processor_dict():
        return {"templates": ["a photo of a {}.", "a {} in the scene."]}

    @classmethod
    def _setup_image_processor(cls):
        return CLIPRCImageProcessor(
            size={"shortest_edge": 32, "longest_edge": 32}, crop_size={"height": 32, "width": 32}
        )

    @classmethod
    def _setup_tokenizer(cls):
        return build_test_tokenizer()
