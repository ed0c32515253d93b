"""ddetr: a fast, pure-PyTorch Deformable DETR with transformers-compatible names and checkpoints."""

from ddetr.checkpoint.hub import CheckpointNotFoundError
from ddetr.checkpoint.weights import CheckpointError
from ddetr.model.configuration import DeformableDetrConfig
from ddetr.model.deformable_detr import DeformableDetrModel
from ddetr.model.object_detection import DeformableDetrForObjectDetection
from ddetr.model.outputs import DeformableDetrModelOutput, DeformableDetrObjectDetectionOutput
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
