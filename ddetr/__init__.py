"""ddetr: a fast, pure-PyTorch Deformable DETR with transformers-compatible names and checkpoints."""

from ddetr.configuration import DeformableDetrConfig
from ddetr.detection import DeformableDetrForObjectDetection
from ddetr.hub import CheckpointNotFoundError
from ddetr.modeling import DeformableDetrModel
from ddetr.outputs import DeformableDetrModelOutput, DeformableDetrObjectDetectionOutput
from ddetr.pipeline import ObjectDetectionPipeline, pipeline
from ddetr.processing import (
    AnnotationError,
    DeformableDetrFeatureExtractor,
    DeformableDetrImageProcessor,
    DeformableDetrImageProcessorFast,
    ImageInputError,
    load_image,
    post_process_object_detection,
)
from ddetr.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "AnnotationError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DeformableDetrConfig",
    "DeformableDetrFeatureExtractor",
    "DeformableDetrForObjectDetection",
    "DeformableDetrImageProcessor",
    "DeformableDetrImageProcessorFast",
    "DeformableDetrModel",
    "DeformableDetrModelOutput",
    "DeformableDetrObjectDetectionOutput",
    "ImageInputError",
    "ObjectDetectionPipeline",
    "load_image",
    "pipeline",
    "post_process_object_detection",
]
