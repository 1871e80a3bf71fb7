"""Segmentation datasets ([`load_segmentation_dataset`]) and the reference's training augmentation."""

from .loading import (
    COCO_STUFF_UNUSED_IDS,
    ID2LABEL_FILE,
    SegmentationDecoder,
    as_rgb_image,
    coco_stuff_train_id_lut,
    dataset_class_names,
    installed_decoder,
    load_segmentation_dataset,
    read_id2label_file,
)
from .transforms import (
    REFERENCE_IMAGE_MEAN,
    REFERENCE_IMAGE_STD,
    AugmentedTrainSamples,
    SegmentationTrainTransform,
    collate_fn,
    photometric_distortion,
    random_crop_box,
)


__all__ = [
    "AugmentedTrainSamples",
    "COCO_STUFF_UNUSED_IDS",
    "ID2LABEL_FILE",
    "REFERENCE_IMAGE_MEAN",
    "REFERENCE_IMAGE_STD",
    "SegmentationDecoder",
    "SegmentationTrainTransform",
    "as_rgb_image",
    "coco_stuff_train_id_lut",
    "collate_fn",
    "dataset_class_names",
    "installed_decoder",
    "load_segmentation_dataset",
    "photometric_distortion",
    "random_crop_box",
    "read_id2label_file",
]
