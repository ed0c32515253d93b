"""A constant-velocity Kalman filter over boxes: the SORT / ByteTrack motion model, batched over tracks.

The state of one track is (centre x, centre y, aspect = width / height, height) and the velocity of each, 8 numbers.
Position and velocity noise are proportional to the box height, so a large (near) object may move more pixels per
frame than a small (far) one before a match looks unlikely. The aspect gets small fixed noise: objects seldom change
shape quickly, and a fixed aspect keeps a box's width tied to its height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Heights are raised to this many pixels before dividing by them: a zero-height detection would otherwise give an
# infinite aspect and a zero noise scale (a singular covariance). No real detection is this thin.
_MIN_HEIGHT = 1e-3

# x' = x + velocity for one frame; the same matrix for every track. (8, 8) state transition.
_TRANSITION = np.eye(8)
_TRANSITION[:4, 4:] = np.eye(4)

# Fixed noise of the aspect (not scaled by height): its initial value, per frame of motion, per measurement.
_ASPECT_STD = 1e-2
_ASPECT_VELOCITY_STD = 1e-5
_ASPECT_MEASUREMENT_STD = 1e-1


def xyxy_to_xyah(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) corner boxes (x0, y0, x1, y1) to (centre x, centre y, aspect, height), float64."""
    boxes = np.asarray(boxes, dtype=np.float64)
    width = np.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = np.maximum(boxes[..., 3] - boxes[..., 1], _MIN_HEIGHT)
    centre_x = (boxes[..., 0] + boxes[..., 2]) / 2
    centre_y = (boxes[..., 1] + boxes[..., 3]) / 2
    return np.stack([centre_x, centre_y, width / height, height], axis=-1)


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """(..., 4) (centre x, centre y, aspect, height) to corner boxes; a full state (..., 8) also works."""
    xyah = np.asarray(xyah, dtype=np.float64)
    centre_x, centre_y, aspect, height = xyah[..., 0], xyah[..., 1], xyah[..., 2], xyah[..., 3]
    width = aspect * height
    return np.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], axis=-1)


def _diagonal(variances: np.ndarray) -> np.ndarray:
    """(tracks, n) variances to (tracks, n, n) diagonal covariances."""
    tracks, size = variances.shape
    covariance = np.zeros((tracks, size, size))
    index = np.arange(size)
    covariance[:, index, index] = variances
    return covariance


def _state_covariance(position_std: np.ndarray, velocity_std: np.ndarray) -> np.ndarray:
    """(tracks, 8, 8) diagonal covariance from (tracks,) position and velocity standard deviations in pixels (the
    aspect and its velocity take their fixed ones)."""
    tracks = position_std.shape[0]
    aspect_std = np.full(tracks, _ASPECT_STD)
    aspect_velocity_std = np.full(tracks, _ASPECT_VELOCITY_STD)
    positions = [position_std, position_std, aspect_std, position_std]
    velocities = [velocity_std, velocity_std, aspect_velocity_std, velocity_std]
    std = np.stack([*positions, *velocities], axis=1)
    return _diagonal(std**2)


@dataclass(frozen=True)
class KalmanBoxFilter:
    """Constant-velocity Kalman filter; every method takes and returns a batch of tracks.

    position_weight and velocity_weight are standard deviations as fractions of the box height: ByteTrack's 1/20
    (a detection's centre and height are uncertain by about 5% of its height) and 1/160 (per-frame velocity change).
    """

    position_weight: float = 1 / 20
    velocity_weight: float = 1 / 160

    def initiate(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New tracks from (tracks, 4) xyxy detections: (tracks, 8) mean state, (tracks, 8, 8) covariance.

        The velocity starts at zero with a wide spread (ten frames' worth of velocity noise), so the first matches
        set it; the position spread is twice a measurement's, as one detection is all that is known.
        """
        measurement = xyxy_to_xyah(boxes)  # (tracks, 4) centre x, centre y, aspect, height
        tracks = measurement.shape[0]
        mean = np.concatenate([measurement, np.zeros((tracks, 4))], axis=1)  # (tracks, 8) mean state
        height = measurement[:, 3]
        covariance = _state_covariance(2 * self.position_weight * height, 10 * self.velocity_weight * height)
        return mean, covariance

    def predict(self, mean: np.ndarray, covariance: np.ndarray, steps: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(tracks, 8) mean state and (tracks, 8, 8) covariance moved on by `steps` frames (new arrays).

        Frame by frame, because the motion noise added at each frame scales with that frame's predicted height.
        """
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        mean = np.asarray(mean, dtype=np.float64)
        covariance = np.asarray(covariance, dtype=np.float64)
        for _ in range(int(steps)):
            height = mean[:, 3]
            motion_noise = _state_covariance(self.position_weight * height, self.velocity_weight * height)
            mean = mean @ _TRANSITION.T
            covariance = _TRANSITION @ covariance @ _TRANSITION.T + motion_noise
        return mean, covariance

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The measurement a track expects: (tracks, 4) mean (centre x, centre y, aspect, height) and its
        (tracks, 4, 4) covariance, the state's spread plus the detector's own noise."""
        mean = np.asarray(mean, dtype=np.float64)
        covariance = np.asarray(covariance, dtype=np.float64)
        height = mean[:, 3]
        position = self.position_weight * height
        std = np.stack([position, position, np.full(mean.shape[0], _ASPECT_MEASUREMENT_STD), position], axis=1)
        # The observation matrix only picks the first four state entries, so H P H^T is the top-left block.
        return mean[:, :4].copy(), covariance[:, :4, :4] + _diagonal(std**2)

    def update(self, mean: np.ndarray, covariance: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correct (tracks, 8) mean state and (tracks, 8, 8) covariance with (tracks, 4) xyxy detections, one per
        track (new arrays)."""
        mean = np.asarray(mean, dtype=np.float64)
        covariance = np.asarray(covariance, dtype=np.float64)
        measurement = xyxy_to_xyah(boxes)  # (tracks, 4)
        projected_mean, projected_covariance = self.project(mean, covariance)  # (tracks, 4), (tracks, 4, 4)
        # Gain K = P H^T S^-1; with P and S symmetric, K^T = S^-1 (H P), and H P is the top four rows of P.
        # Solving beats inverting S for accuracy.
        gain = np.linalg.solve(projected_covariance, covariance[:, :4, :]).transpose(0, 2, 1)  # (tracks, 8, 4)
        innovation = measurement - projected_mean  # (tracks, 4)
        new_mean = mean + np.einsum("tij,tj->ti", gain, innovation)
        new_covariance = covariance - gain @ projected_covariance @ gain.transpose(0, 2, 1)
        # Rounding leaves the subtraction slightly asymmetric; left alone it would grow over many updates.
        new_covariance = (new_covariance + new_covariance.transpose(0, 2, 1)) / 2
        return new_mean, new_covariance
