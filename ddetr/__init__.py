"""ddetr: a fast, pure-PyTorch Deformable DETR with transformers-compatible names and checkpoints."""

from ddetr.configuration import DeformableDetrConfig
from ddetr.detection import DeformableDetrForObjectDetection
from ddetr.hub import CheckpointNotFoundError
from ddetr.modeling import DeformableDetrModel
from ddetr.outputs import DeformableDetrModelOutput, DeformableDetrObjectDetectionOutput
from ddetr.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrModelOutput",
    "DeformableDetrObjectDetectionOutput",
]
