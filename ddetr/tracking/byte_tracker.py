"""A ByteTrack-style multi-object tracker: detections in, one track id per detection out.

Each frame, confident detections are matched first to every track (the Kalman prediction of its box against the
detection, by IoU); detections of middling score are then matched only to tracks that were matched the frame before
and are still free. Those middling detections are the point of ByteTrack: an occluded or blurred object often still
scores something, and using it keeps its track alive, while on its own such a detection is too often a false
positive to start a track.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ddetr.boxes import box_iou
from ddetr.tracking.kalman import KalmanBoxFilter, xyah_to_xyxy


@dataclass(frozen=True)
class TrackerSettings:
    """Thresholds of a ByteTracker (see the field comments); checked on construction."""

    high_threshold: float = 0.5  # detections scoring >= this go to the first association and may start tracks
    low_threshold: float = 0.1  # detections in [low, high) only extend existing tracks (second association)
    match_iou: float = 0.2  # minimum IoU for the first association
    low_match_iou: float = 0.5  # minimum IoU for the second association: low scores need a closer fit
    max_lost_frames: int = 30  # a track unmatched for more than this many frames dies
    min_hits: int = 2  # matched frames (birth included) before a track born after the first frame is confirmed

    def __post_init__(self) -> None:
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"TrackerSettings.{name} must be in [0, 1], got {value!r}")
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"TrackerSettings.low_threshold must be <= high_threshold ({self.high_threshold!r}), "
                f"got {self.low_threshold!r}"
            )
        for name in ("match_iou", "low_match_iou"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"TrackerSettings.{name} must be in (0, 1], got {value!r}")
        for name, minimum in (("max_lost_frames", 0), ("min_hits", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(f"TrackerSettings.{name} must be an integer >= {minimum}, got {value!r}")


def assign(cost: np.ndarray, max_cost: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best one-to-one matching of the rows of a (rows, columns) cost to its columns; a pair costing more than
    max_cost (np.inf and NaN included) is forbidden.

    "Best" maximises the total saving ``max_cost - cost`` over the matched pairs: a pair is worth making exactly when
    it costs less than leaving its row and its column unmatched (ByteTrack's lapjv call with a cost limit solves the
    same problem). Forbidden pairs are given no saving, so the Hungarian solution over all pairs, once they are
    dropped, is a best matching among the allowed ones.
    Returns (pairs, 2) int64 [row, column] pairs, then the unmatched rows and the unmatched columns, all ascending.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a (rows, columns) matrix, got shape {cost.shape}")
    if not np.isfinite(max_cost):
        raise ValueError(f"max_cost must be finite, got {max_cost!r}")
    allowed = cost <= max_cost  # NaN compares False: forbidden
    saving = np.zeros_like(cost)
    saving[allowed] = max_cost - cost[allowed]
    rows, columns = linear_sum_assignment(saving, maximize=True)
    keep = allowed[rows, columns]
    pairs = np.stack([rows[keep], columns[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    unmatched_rows = np.setdiff1d(np.arange(cost.shape[0]), pairs[:, 0]).astype(np.int64)
    unmatched_columns = np.setdiff1d(np.arange(cost.shape[1]), pairs[:, 1]).astype(np.int64)
    return pairs, unmatched_rows, unmatched_columns


@dataclass(eq=False)
class _Track:
    track_id: int
    label: int
    score: float
    mean: np.ndarray  # (8,) Kalman mean state: centre x, centre y, aspect, height, then their velocities
    covariance: np.ndarray  # (8, 8) Kalman state covariance
    hits: int  # matched frames, birth included
    confirmed: bool
    last_matched_frame: int
    matched_last_update: bool  # "tracked" in ByteTrack's terms; False while lost


def _checked_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (detections, 4), got {boxes.shape}")
    detections = boxes.shape[0]
    for name, array in (("scores", scores), ("labels", labels)):
        if array.shape != (detections,):
            raise ValueError(f"{name} must have shape ({detections},) to match boxes {boxes.shape}, got {array.shape}")
    for name, array in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3]} among them")
    if not np.issubdtype(labels.dtype, np.integer) and (labels != np.round(labels)).any():
        raise ValueError(f"labels must be integer class ids, got {labels[labels != np.round(labels)][:3]} among them")
    return boxes.astype(np.float64), scores.astype(np.float64), labels.astype(np.int64)


class ByteTracker:
    """Gives each detection of each frame a track id that follows its object from frame to frame (see update).

    Tracks born in the first update are confirmed at once; later ones after settings.min_hits matched updates, and
    only confirmed tracks count in seen_counts.
    """

    def __init__(self, *, settings: TrackerSettings = TrackerSettings()) -> None:
        if not isinstance(settings, TrackerSettings):
            raise TypeError(f"settings must be a TrackerSettings, got {type(settings).__name__}")
        self.settings = settings
        self._filter = KalmanBoxFilter()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._frame_count = 0
        self._seen: dict[int, int] = {}  # label -> confirmed tracks ever

    def reset(self) -> None:
        """Forget every track and count; ids start again at 1."""
        self._tracks = []
        self._next_id = 1
        self._frame_count = 0
        self._seen = {}

    @property
    def frame_count(self) -> int:
        """Frames since construction or reset: the sum of every update's steps."""
        return self._frame_count

    def seen_counts(self) -> dict[int, int]:
        """label -> number of distinct confirmed tracks seen so far, alive or dead (labels never confirmed absent)."""
        return dict(sorted(self._seen.items()))

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, steps: int = 1) -> np.ndarray:
        """One frame.

        boxes (detections, 4) float xyxy pixels; scores (detections,); labels (detections,) int class ids.
        steps: frames elapsed since the previous update (>= 1). A caller that skipped frames passes more, so that
        motion prediction covers the gap and lost tracks age by `steps`, as over steps - 1 empty updates. Skipped
        frames are not misses, though: a track matched in the previous update is still the second association's,
        and an unconfirmed one is not killed by frames nobody looked at. On the first update, steps only adds to
        frame_count.
        Returns (detections,) int64 track ids in input order: every detection scoring >= high_threshold gets one
        (an existing track's or a newly born one's); a detection in [low_threshold, high_threshold) gets the id
        of the track it extended, else -1; below low_threshold: -1.
        """
        boxes, scores, labels = _checked_detections(boxes, scores, labels)
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        settings = self.settings
        first_frame = self._frame_count == 0
        self._frame_count += int(steps)
        frame = self._frame_count

        # Tracks that would have run out of lost frames during skipped frames are gone before this frame's matching.
        self._tracks = [t for t in self._tracks if frame - 1 - t.last_matched_frame <= settings.max_lost_frames]
        self._predict(int(steps))
        tracks = self._tracks
        track_boxes = xyah_to_xyxy(np.array([t.mean[:4] for t in tracks]).reshape(-1, 4))  # (tracks, 4) predicted
        track_labels = np.array([t.label for t in tracks], dtype=np.int64)  # (tracks,)

        high = np.flatnonzero(scores >= settings.high_threshold)
        low = np.flatnonzero((scores >= settings.low_threshold) & (scores < settings.high_threshold))
        matches: dict[int, int] = {}  # track index -> detection index

        def associate(track_indices: np.ndarray, detection_indices: np.ndarray, min_iou: float) -> None:
            # (tracks, detections); a degenerate pair's NaN counts as forbidden in assign
            iou, _ = box_iou(torch.from_numpy(track_boxes[track_indices]), torch.from_numpy(boxes[detection_indices]))
            cost = 1 - iou.numpy()
            cost[track_labels[track_indices][:, None] != labels[detection_indices][None, :]] = np.inf
            pairs, _, _ = assign(cost, 1 - min_iou)
            for row, column in pairs:
                matches[int(track_indices[row])] = int(detection_indices[column])

        associate(np.arange(len(tracks)), high, settings.match_iou)
        # Only tracks seen last update may take a low-score detection: a lost track's prediction is too uncertain
        # to trust a detection that is itself doubtful.
        recent = np.array([i for i, t in enumerate(tracks) if t.matched_last_update and i not in matches], np.int64)
        matched_high = set(matches.values())
        associate(recent, low, settings.low_match_iou)

        track_ids = np.full(len(scores), -1, dtype=np.int64)
        if matches:
            matched = sorted(matches)
            detections = [matches[i] for i in matched]
            means, covariances = self._filter.update(
                np.stack([tracks[i].mean for i in matched]),
                np.stack([tracks[i].covariance for i in matched]),
                boxes[detections],
            )
            for i, detection, mean, covariance in zip(matched, detections, means, covariances):
                track = tracks[i]
                track.mean, track.covariance = mean, covariance
                track.score, track.label = float(scores[detection]), int(labels[detection])
                track.hits += 1
                track.last_matched_frame = frame
                if not track.confirmed and track.hits >= settings.min_hits:
                    self._confirm(track)
                track_ids[detection] = track.track_id

        for i, track in enumerate(tracks):
            track.matched_last_update = i in matches
        # An unconfirmed track that misses a frame is most likely a flicker: it dies without being counted.
        self._tracks = [
            t
            for t in tracks
            if t.matched_last_update or (t.confirmed and frame - t.last_matched_frame <= settings.max_lost_frames)
        ]

        unmatched_high = [d for d in high.tolist() if d not in matched_high]
        if unmatched_high:
            means, covariances = self._filter.initiate(boxes[unmatched_high])
            for detection, mean, covariance in zip(unmatched_high, means, covariances):
                track = _Track(
                    track_id=self._next_id,
                    label=int(labels[detection]),
                    score=float(scores[detection]),
                    mean=mean,
                    covariance=covariance,
                    hits=1,
                    confirmed=False,
                    last_matched_frame=frame,
                    matched_last_update=True,
                )
                self._next_id += 1
                # Nothing came before the first frame to vouch for or against its detections, as in ByteTrack.
                if first_frame or settings.min_hits <= 1:
                    self._confirm(track)
                self._tracks.append(track)
                track_ids[detection] = track.track_id
        return track_ids

    def _confirm(self, track: _Track) -> None:
        track.confirmed = True
        self._seen[track.label] = self._seen.get(track.label, 0) + 1

    def _predict(self, steps: int) -> None:
        if not self._tracks:
            return
        means = np.stack([t.mean for t in self._tracks])  # (tracks, 8) mean state
        covariances = np.stack([t.covariance for t in self._tracks])  # (tracks, 8, 8) state covariance
        # A lost track keeps its size: a height velocity extrapolated across a long gap would blow the box up or
        # turn it inside out, and sizes change slowly anyway.
        lost = np.array([not t.matched_last_update for t in self._tracks])
        means[lost, 7] = 0.0
        means, covariances = self._filter.predict(means, covariances, steps)
        for track, mean, covariance in zip(self._tracks, means, covariances):
            track.mean, track.covariance = mean, covariance
