"""Multi-object tracking of detections across video frames: a ByteTrack-style tracker and its Kalman filter."""

from ddetr.tracking.byte_tracker import ByteTracker, TrackerSettings
from ddetr.tracking.kalman import KalmanBoxFilter

__all__ = ["ByteTracker", "KalmanBoxFilter", "TrackerSettings"]
