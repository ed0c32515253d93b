"""Image processing for Deformable DETR: guarded image loading, preprocessing (PIL and torch) and post-processing.

Typical use (what a detection pipeline does)::

    processor = DeformableDetrImageProcessor()
    image = processor.load_image("photo.jpg")            # ImageInputError for anything unusable
    inputs = processor(image)                             # pixel_values, pixel_mask
    outputs = model(**inputs)
    detections = processor.post_process_object_detection(outputs, 0.5, target_sizes=[image.size[::-1]])
"""

from ddetr.processing.batch_feature import BatchFeature
from ddetr.processing.errors import AnnotationError, ImageInputError
from ddetr.processing.image_loading import (
    ALLOWED_IMAGE_FORMATS,
    DEFAULT_MAX_IMAGE_PIXELS,
    load_image,
    open_image,
)
from ddetr.processing.image_processor import DeformableDetrFeatureExtractor, DeformableDetrImageProcessor
from ddetr.processing.image_processor_fast import DeformableDetrImageProcessorFast
from ddetr.processing.post_process import post_process_object_detection
from ddetr.processing.resize import get_output_size, get_size_with_aspect_ratio

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "AnnotationError",
    "BatchFeature",
    "DeformableDetrFeatureExtractor",
    "DeformableDetrImageProcessor",
    "DeformableDetrImageProcessorFast",
    "ImageInputError",
    "get_output_size",
    "get_size_with_aspect_ratio",
    "load_image",
    "open_image",
    "post_process_object_detection",
]
