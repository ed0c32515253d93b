"""ByteTracker and its Kalman filter on hand-made tracks: boxes whose every position the test chooses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ddetr.boxes import box_iou
from ddetr.tracking import ByteTracker, KalmanBoxFilter, TrackerSettings
from ddetr.tracking.byte_tracker import assign
from ddetr.tracking.kalman import xyah_to_xyxy, xyxy_to_xyah

# One detection: (xyxy box, score, label).
Detection = tuple[list[float], float, int]


def box(center_x: float, center_y: float, width: float = 40.0, height: float = 60.0) -> list[float]:
    return [center_x - width / 2, center_y - height / 2, center_x + width / 2, center_y + height / 2]


def track(
    tracker: ByteTracker, detections: list[Detection], *, steps: int = 1, shuffle: int | None = None
) -> list[int]:
    """One update; ids in the order of `detections`. With a `shuffle` seed the tracker sees them in another order,
    so that nothing can ride on the order detections arrive in."""
    order = np.arange(len(detections))
    if shuffle is not None:
        order = np.random.default_rng(shuffle).permutation(len(detections))
    boxes = np.array([detections[i][0] for i in order], dtype=np.float64).reshape(-1, 4)
    scores = np.array([detections[i][1] for i in order], dtype=np.float64)
    labels = np.array([detections[i][2] for i in order], dtype=np.int64)
    ids = tracker.update(boxes, scores, labels, steps=steps)
    assert ids.dtype == np.int64 and ids.shape == (len(detections),)
    restored = np.empty_like(ids)
    restored[order] = ids
    return restored.tolist()


def iou(box_a: list[float], box_b: list[float]) -> float:
    iou, _ = box_iou(torch.tensor([box_a], dtype=torch.float64), torch.tensor([box_b], dtype=torch.float64))
    return float(iou[0, 0])


# --- hand-made tracks


@pytest.mark.parametrize("labels", [(0, 1), (3, 3)], ids=["different-labels", "same-label"])
def test_crossing_boxes_keep_their_ids(labels: tuple[int, int]) -> None:
    # 16 px a frame on 40 px wide boxes, 20 px apart vertically: at the crossing a box's last position overlaps the
    # other box's new one (IoU 0.5) more than its own (0.43), so only motion prediction keeps the ids apart.
    tracker = ByteTracker()
    ids_per_frame = []
    for frame in range(41):
        rightward = box(16 * frame, 100)
        leftward = box(624 - 16 * frame, 120)
        ids_per_frame.append(track(tracker, [(rightward, 0.9, labels[0]), (leftward, 0.9, labels[1])], shuffle=frame))
    assert iou(box(16 * 19, 100), box(624 - 16 * 20, 120)) > iou(box(16 * 19, 100), box(16 * 20, 100))  # the premise
    assert all(ids == [1, 2] for ids in ids_per_frame), ids_per_frame


def test_detection_of_another_label_never_joins_a_track() -> None:
    tracker = ByteTracker()
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [1]
    assert track(tracker, [(box(100, 100), 0.9, 1)]) == [2]  # same place, other class: a new track
    assert track(tracker, [(box(100, 100), 0.9, 1), (box(100, 100), 0.3, 7)]) == [2, -1]


def test_box_reappearing_after_a_gap_is_found_where_its_motion_took_it() -> None:
    tracker = ByteTracker()
    positions = {frame: box(100 + 10 * frame, 200) for frame in range(25)}
    for frame in range(10):
        assert track(tracker, [(positions[frame], 0.9, 0)]) == [1]
    for _ in range(6):  # frames 10-15: nothing detected
        assert track(tracker, []) == []
    assert iou(positions[9], positions[16]) == 0.0  # its last position is no help
    for frame in range(16, 25):
        assert track(tracker, [(positions[frame], 0.9, 0)]) == [1]


def test_low_score_detections_extend_a_track_but_start_none() -> None:
    tracker = ByteTracker()
    scores = [0.9] * 5 + [0.3] * 3 + [0.9] * 3
    for frame, score in enumerate(scores):
        detections = [(box(100 + 5 * frame, 100), score, 0)]
        if score < 0.5:
            detections.append((box(500, 500), 0.3, 0))  # middling score, no track near it
            detections.append((box(100 + 5 * frame, 100, 38, 58), 0.05, 0))  # under low_threshold, on the track
        assert track(tracker, detections) == [1] + [-1] * (len(detections) - 1)
    # A low-score detection may only extend a track matched the update before, not a lost one.
    assert track(tracker, []) == []
    assert track(tracker, [(box(155, 100), 0.3, 0)]) == [-1]
    assert track(tracker, [(box(160, 100), 0.9, 0)]) == [1]


@pytest.mark.parametrize(("empty_updates", "expected_id"), [(5, 1), (6, 2)])
def test_track_lost_for_more_than_max_lost_frames_dies(empty_updates: int, expected_id: int) -> None:
    tracker = ByteTracker(settings=TrackerSettings(max_lost_frames=5))
    for _ in range(3):
        assert track(tracker, [(box(100, 100), 0.9, 0)]) == [1]
    for _ in range(empty_updates):
        track(tracker, [])
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [expected_id]


def test_unconfirmed_track_that_misses_a_frame_dies() -> None:
    tracker = ByteTracker()
    assert track(tracker, []) == []  # the first frame is over: later tracks must earn confirmation
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [1]
    assert track(tracker, []) == []
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [2]
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [2]  # confirmed now (two hits) ...
    assert track(tracker, []) == []
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [2]  # ... so a miss only makes it lost
    assert tracker.seen_counts() == {0: 1}


def test_steps_behave_like_empty_updates() -> None:
    settings = TrackerSettings(max_lost_frames=3)
    stepped, stepwise = ByteTracker(settings=settings), ByteTracker(settings=settings)

    def scene(frame: int) -> list[Detection]:
        detections: list[Detection] = []
        if frame <= 5 or frame >= 9:
            detections.append((box(100 + 12 * frame, 100), 0.9, 0))  # moves out of its old place during the gap
            detections.append((box(400, 300 + 2 * frame), 0.8, 1))
        if frame <= 5 or frame >= 12:
            detections.append((box(600, 100), 0.9, 0))  # gone too long: back with a new id
        if frame <= 4 or frame == 9:
            detections.append((box(300, 500), 0.9, 2))  # already lost when the gap starts: dies during it
        return detections

    for frame in range(1, 6):
        assert track(stepped, scene(frame)) == track(stepwise, scene(frame))
    for _ in range(6, 9):
        track(stepwise, [])
    for frame in range(9, 14):
        ids = track(stepped, scene(frame), steps=4 if frame == 9 else 1)
        assert ids == track(stepwise, scene(frame)), frame
    assert ids == [1, 2, 6]  # the fourth object (id 5) came back too late at frame 9, and the third at frame 12
    assert stepped.frame_count == stepwise.frame_count == 13
    assert stepped.seen_counts() == stepwise.seen_counts()


def test_empty_input_ages_tracks() -> None:
    tracker = ByteTracker(settings=TrackerSettings(max_lost_frames=2))
    track(tracker, [(box(100, 100), 0.9, 0)])
    ids = tracker.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    assert ids.dtype == np.int64 and ids.shape == (0,)
    tracker.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), steps=2)
    assert tracker.frame_count == 4
    assert track(tracker, [(box(100, 100), 0.9, 0)]) == [2]  # three frames missed, two allowed


# --- counting


def test_seen_counts_confirmed_tracks_only() -> None:
    tracker = ByteTracker()
    for frame in range(10):
        detections: list[Detection] = [(box(100 + 4 * frame, 100), 0.9, 0), (box(500, 100 + 3 * frame), 0.8, 2)]
        if frame == 0:
            detections.append((box(300, 400), 0.9, 0))  # one frame, but the first: confirmed at once
        if frame >= 4:
            detections.append((box(700, 400 - 5 * frame), 0.7, 0))  # born later: confirmed at its second hit
        if frame == 6:
            detections.append((box(900, 900), 0.9, 2))  # a one-frame flicker
        track(tracker, detections)
        if frame == 4:
            assert tracker.seen_counts() == {0: 2, 2: 1}
    assert tracker.seen_counts() == {0: 3, 2: 1}


# --- Kalman filter


def test_kalman_prediction_converges_on_constant_velocity() -> None:
    kalman = KalmanBoxFilter()

    def true_box(frame: int) -> np.ndarray:  # moving, and growing slowly
        x, y, width, height = 100 + 6 * frame, 50 + 3 * frame, 40 + 0.25 * frame, 80 + 0.5 * frame
        return np.array([[x, y, x + width, y + height]])

    mean, covariance = kalman.initiate(true_box(0))
    errors = []
    for frame in range(1, 16):
        mean, covariance = kalman.predict(mean, covariance)
        errors.append(np.abs(xyah_to_xyxy(mean) - true_box(frame)).max())
        mean, covariance = kalman.update(mean, covariance, true_box(frame))
    assert errors[0] > 5  # it starts knowing no velocity
    assert max(errors[10:]) < 1.0, errors
    assert np.allclose(covariance, covariance.transpose(0, 2, 1))
    assert (np.linalg.eigvalsh(covariance) > 0).all()


def test_kalman_predict_n_equals_n_single_predictions() -> None:
    kalman = KalmanBoxFilter()
    mean, covariance = kalman.initiate(np.array([[10.0, 20.0, 50.0, 100.0], [200.0, 200.0, 230.0, 260.0]]))
    mean, covariance = kalman.update(
        *kalman.predict(mean, covariance), np.array([[14, 22, 55, 103], [197, 201, 227, 262]])
    )
    one_by_one = (mean, covariance)
    for _ in range(5):
        one_by_one = kalman.predict(*one_by_one)
    at_once = kalman.predict(mean, covariance, steps=5)
    np.testing.assert_allclose(at_once[0], one_by_one[0], rtol=1e-12)
    np.testing.assert_allclose(at_once[1], one_by_one[1], rtol=1e-12)
    np.testing.assert_allclose(at_once[0][:, :4], mean[:, :4] + 5 * mean[:, 4:], rtol=1e-12)
    assert (np.diagonal(at_once[1], axis1=1, axis2=2) > np.diagonal(covariance, axis1=1, axis2=2)).all()


def test_kalman_shapes_and_box_round_trip() -> None:
    kalman = KalmanBoxFilter()
    boxes = np.array([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 45.0, 25.0], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(xyah_to_xyxy(xyxy_to_xyah(boxes)), boxes)
    mean, covariance = kalman.initiate(boxes)
    assert mean.shape == (3, 8) and covariance.shape == (3, 8, 8)
    projected_mean, projected_covariance = kalman.project(mean, covariance)
    assert projected_mean.shape == (3, 4) and projected_covariance.shape == (3, 4, 4)
    # A measurement pulls the state toward itself, not past it.
    moved = boxes + 4.0
    updated, _ = kalman.update(mean, covariance, moved)
    shift = xyah_to_xyxy(updated) - boxes
    assert ((shift > 0) & (shift < 4.0)).all()


# --- ids, reset, validation


def test_ids_are_unique_increasing_and_restart_after_reset() -> None:
    tracker = ByteTracker()
    rng = np.random.default_rng(0)
    first_seen: list[int] = []
    for frame in range(30):
        # Objects come and go (each is on screen for a stretch of frames), far apart and still.
        detections = [(box(60 * k, 60 * (k % 5)), 0.9, k % 3) for k in range(20) if k <= frame < k + 3 + k % 4]
        detections += [(box(2000 + rng.uniform(0, 500), 2000), 0.9, 0)] if frame % 7 == 3 else []
        for track_id in track(tracker, detections):
            if track_id not in first_seen:
                first_seen.append(track_id)
    assert first_seen == list(range(1, len(first_seen) + 1))
    assert len(first_seen) == 20 + 4  # and a flicker at frames 3, 10, 17, 24
    tracker.reset()
    assert tracker.frame_count == 0 and tracker.seen_counts() == {}
    assert track(tracker, [(box(0, 0), 0.9, 0), (box(500, 0), 0.9, 0)]) == [1, 2]


@pytest.mark.parametrize(
    ("boxes", "scores", "labels", "steps", "message"),
    [
        (np.zeros((2, 3)), np.zeros(2), np.zeros(2, int), 1, "boxes must have shape"),
        (np.zeros(4), np.zeros(1), np.zeros(1, int), 1, "boxes must have shape"),
        (np.zeros((2, 4)), np.zeros(3), np.zeros(2, int), 1, "scores must have shape"),
        (np.zeros((2, 4)), np.zeros((2, 1)), np.zeros(2, int), 1, "scores must have shape"),
        (np.zeros((2, 4)), np.zeros(2), np.zeros(1, int), 1, "labels must have shape"),
        (np.array([[0, 0, np.nan, 1]]), np.ones(1), np.zeros(1, int), 1, "boxes must be finite"),
        (np.zeros((1, 4)), np.array([np.inf]), np.zeros(1, int), 1, "scores must be finite"),
        (np.zeros((1, 4)), np.ones(1), np.array([0.5]), 1, "labels must be integer"),
        (np.zeros((1, 4)), np.array(["high"]), np.zeros(1, int), 1, "scores must be numeric"),
        (np.zeros((1, 4)), np.ones(1), np.zeros(1, int), 0, "steps must be"),
        (np.zeros((1, 4)), np.ones(1), np.zeros(1, int), 1.5, "steps must be"),
    ],
)
def test_update_rejects_bad_input(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, steps: int, message: str
) -> None:
    tracker = ByteTracker()
    with pytest.raises(ValueError, match=message):
        tracker.update(boxes, scores, labels, steps=steps)
    assert tracker.frame_count == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("low_threshold", -0.1),
        ("low_threshold", 0.7),  # above high_threshold
        ("high_threshold", 1.5),
        ("high_threshold", float("nan")),
        ("match_iou", 0.0),
        ("low_match_iou", 1.2),
        ("max_lost_frames", -1),
        ("max_lost_frames", 2.5),
        ("min_hits", 0),
    ],
)
def test_settings_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"TrackerSettings\.{field} .*got {value!r}"):
        TrackerSettings(**{field: value})


def test_settings_accept_edges() -> None:
    TrackerSettings(low_threshold=0.0, high_threshold=0.0, match_iou=1.0, max_lost_frames=0, min_hits=1)
    TrackerSettings(low_threshold=1.0, high_threshold=1.0)


# --- the assignment step against brute force


def brute_force_best_saving(cost: np.ndarray, max_cost: float) -> float:
    """The largest total saving of any matching, by trying every one: each row takes a distinct column or none."""
    rows, columns = cost.shape
    best = 0.0
    for choice in itertools.product([None, *range(columns)], repeat=rows):
        taken = [column for column in choice if column is not None]
        if len(taken) != len(set(taken)):
            continue
        pairs = [(row, column) for row, column in enumerate(choice) if column is not None]
        if all(cost[row, column] <= max_cost for row, column in pairs):
            best = max(best, sum(max_cost - cost[row, column] for row, column in pairs))
    return best


def test_assignment_is_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        rows, columns = rng.integers(0, 5), rng.integers(0, 6)
        cost = rng.uniform(0, 1, size=(rows, columns))
        cost[rng.uniform(size=(rows, columns)) < 0.2] = np.inf  # forbidden, like a pair of different labels
        max_cost = float(rng.uniform(0.2, 0.9))
        pairs, unmatched_rows, unmatched_columns = assign(cost, max_cost)
        assert len(set(pairs[:, 0])) == len(pairs) and len(set(pairs[:, 1])) == len(pairs)
        assert all(cost[row, column] <= max_cost for row, column in pairs)
        assert sorted([*pairs[:, 0], *unmatched_rows]) == list(range(rows))
        assert sorted([*pairs[:, 1], *unmatched_columns]) == list(range(columns))
        saving = sum(max_cost - cost[row, column] for row, column in pairs)
        assert saving == pytest.approx(brute_force_best_saving(cost, max_cost), abs=1e-12)


def test_assignment_prefers_the_better_total_over_the_best_single_pair() -> None:
    # Greedy would take (0, 0) first and leave row 1 unmatched; the optimum pairs both rows.
    cost = np.array([[0.1, 0.3], [0.2, np.inf]])
    pairs, unmatched_rows, unmatched_columns = assign(cost, 0.8)
    assert pairs.tolist() == [[0, 1], [1, 0]]
    assert unmatched_rows.size == 0 and unmatched_columns.size == 0
