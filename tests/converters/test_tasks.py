"""Task inference, the per-task metrics on arrays with known answers, the budget and the gate."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.converters.tasks import (Budget, Fidelity, LayoutError, TaskSpec, box_agreement, decode, detection_layout, gate,
                                          infer_task, measure, neighbour_agreement, neighbour_ranks, nrmse, softmax_kl)

RNG = np.random.default_rng(0)


def _yolo_head(n: int = 2, classes: int = 3, anchors: int = 64, *, objectness: bool = False, channels_first: bool = True) -> np.ndarray:
    """A raw head with one confident box per image (class 1, at 100,100 size 40x40) and background elsewhere."""
    ch = 4 + int(objectness) + classes
    rows = np.zeros((n, anchors, ch), dtype=np.float32)
    rows[..., 0:2] = RNG.uniform(0, 320, (n, anchors, 2))
    rows[..., 2:4] = RNG.uniform(5, 30, (n, anchors, 2))
    rows[..., 4:] = RNG.uniform(0, 0.05, (n, anchors, ch - 4))
    rows[:, 0, :4] = [100, 100, 40, 40]
    if objectness:
        rows[:, 0, 4] = 0.9
    rows[:, 0, 4 + int(objectness) + min(1, classes - 1)] = 0.95
    return np.ascontiguousarray(np.moveaxis(rows, 1, 2)) if channels_first else rows


# ------------------------------------------------------------------ inference


def test_unit_rows_are_an_embedding():
    e = RNG.normal(size=(8, 384))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    spec = infer_task(e)
    assert spec.task == "embedding" and "L2-normalised" in spec.reason


def test_logits_are_classification_and_probabilities_too():
    assert infer_task(RNG.normal(size=(8, 10))).task == "classification"
    p = np.exp(RNG.normal(size=(8, 10)))
    spec = infer_task(p / p.sum(1, keepdims=True))
    assert spec.task == "classification" and "probabilities" in spec.reason


@pytest.mark.parametrize("objectness,channels_first", [(False, True), (True, False)])
def test_yolo_heads_are_detection_with_their_layout(objectness, channels_first):
    spec = infer_task([_yolo_head(objectness=objectness, channels_first=channels_first)])
    assert spec.task == "detection"
    assert spec.params["objectness"] is objectness and spec.params["num_classes"] == 3 and spec.params["anchors"] == 64
    assert spec.params["layout"] == ("channels_first" if channels_first else "channels_last")


def test_token_states_are_not_taken_for_a_detector():
    spec = infer_task(RNG.normal(size=(2, 32, 384)).astype(np.float32))
    assert spec.task == "regression" and "not a detector head" in spec.reason


def test_flag_wins_over_profile_and_inference():
    logits = RNG.normal(size=(4, 10))
    assert infer_task(logits, given="regression", profile_task="embedding").task == "regression"
    assert infer_task(logits, profile_task="embedding").reason == "the profile says embedding"
    with pytest.raises(ValueError, match="unknown task"):
        infer_task(logits, given="poetry")


def test_integer_pass_through_outputs_are_skipped():
    ids = np.ones((4, 16), dtype=np.int64)
    e = RNG.normal(size=(4, 64))
    spec = infer_task([ids, e / np.linalg.norm(e, axis=1, keepdims=True)])
    assert spec.task == "embedding" and spec.params["output"] == 1


# ------------------------------------------------------------------ hostile detection layouts


@pytest.mark.parametrize("bad,why", [
    (np.zeros((2, 84)), "rank 2"),
    (np.zeros((2, 3, 4, 5)), "rank 4"),
    (np.zeros((0, 6, 100)), "at least one image"),
    (np.zeros((1, 4, 100)), "4 box coordinates plus"),
    (np.zeros((1, 6, 8)), "not a dense detector head"),
    (np.zeros((1, 84, 0)), "4 box coordinates plus"),
    (np.zeros((1, 6, 2_000_001), dtype=np.float16), "beyond what the decoder takes"),
    (np.full((1, 6, 100), np.nan), "NaN or inf"),
    (np.full((1, 6, 100), np.inf), "NaN or inf"),
    (np.array(["a"] * 600).reshape(1, 6, 100), "holds numbers"),
])
def test_layout_parser_refuses_hostile_arrays(bad, why):
    with pytest.raises(LayoutError, match=why):
        detection_layout(bad)


def test_layout_parser_refuses_negative_sizes_and_unbounded_scores():
    h = _yolo_head()
    neg = h.copy()
    neg[:, 2, 5] = -3.0
    with pytest.raises(LayoutError, match="negative box width"):
        detection_layout(neg)
    logits = h.copy()
    logits[:, 4:, :] = 7.0  # raw logits, not sigmoid scores
    with pytest.raises(LayoutError, match="not \\[0, 1\\]"):
        detection_layout(logits)


def test_class_count_follows_the_channels():
    # 4 + C: C = channels - 4 without objectness; a 4+C mismatch with the data shows up as a different C, never a crash.
    assert detection_layout(_yolo_head(classes=80, anchors=400))["num_classes"] == 80
    assert detection_layout(_yolo_head(classes=1))["num_classes"] == 1


def test_given_detection_on_a_non_detector_says_why():
    with pytest.raises(LayoutError):
        infer_task(RNG.normal(size=(4, 10)), given="detection")


# ------------------------------------------------------------------ metrics with known answers


def test_classification_agreement_kl_and_accuracy_drop():
    ref = np.array([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    out = ref.copy()
    out[3] = [0, 5, 0]  # one of four flips
    spec = TaskSpec("classification", "")
    f = measure(spec, ref, out)
    assert f.metric == "top1_disagreement" and f.loss == pytest.approx(0.25) and f.details["top1_agreement"] == 0.75
    assert f.details["kl"] > 0 and measure(spec, ref, ref).details["kl"] == pytest.approx(0.0, abs=1e-12)
    labels = np.array([0, 1, 2, 1])  # the original gets 3/4, the candidate 4/4: no drop
    f2 = measure(spec, ref, out, labels)
    assert f2.metric == "accuracy_drop" and f2.loss == 0.0 and f2.details["accuracy"] == 1.0
    assert measure(spec, out, ref, labels).loss == pytest.approx(0.25)


def test_kl_of_known_distributions():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    assert softmax_kl(p, q) == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))


def test_embedding_cosine_and_neighbours():
    e = np.eye(4)
    spec = TaskSpec("embedding", "")
    assert measure(spec, e, e).loss == 0.0
    rot = e.copy()
    rot[0] = [np.cos(0.1), np.sin(0.1), 0, 0]
    f = measure(spec, e, rot)
    assert f.loss == pytest.approx(1 - np.cos(0.1)) and f.details["cosine_min"] == pytest.approx(np.cos(0.1))
    pts = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    swapped = pts[[0, 2, 1, 3]]  # sample 1 now sits next to 2/3
    assert neighbour_agreement(pts, pts) == 1.0 and neighbour_agreement(pts, swapped) < 1.0


def test_a_near_tie_swaps_the_top_neighbour_but_keeps_it_in_the_top_three():
    # Query 0's two nearest sit 0.001 apart in cosine; a small perturbation swaps them, a large one loses both.
    ref = np.array([[1.0, 0.0, 0.0], [0.9, 0.436, 0.0], [0.9, 0.0, 0.436], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    ref[2, 2] = 0.440
    near = ref.copy()
    near[1, 1] = 0.445
    r = neighbour_ranks(ref, near)
    assert r["neighbour_agreement"] < 1.0 and r["neighbour_in_top3"] == 1.0, r
    far = ref.copy()
    far[0] = [-1.0, 0.0, 0.05]  # query 0 now lands beside sample 5, with its old neighbours out of its top 3
    assert neighbour_ranks(ref, far)["neighbour_in_top3"] < 1.0
    f = measure(TaskSpec("embedding", ""), ref, near)
    assert f.details["neighbour_in_top3"] == 1.0 and f.details["neighbour_agreement"] == r["neighbour_agreement"]


def test_regression_is_relative_to_the_spread_not_the_units():
    ref = RNG.normal(size=(100, 3))
    noise = RNG.normal(size=(100, 3))
    f_small = measure(TaskSpec("regression", ""), ref, ref + 0.01 * noise)
    f_big_units = measure(TaskSpec("regression", ""), 1000 * ref, 1000 * (ref + 0.01 * noise))
    assert f_small.loss == pytest.approx(f_big_units.loss) and 0.005 < f_small.loss < 0.02
    assert f_small.details["snr_db"] == pytest.approx(-20 * np.log10(f_small.loss))
    assert nrmse(np.ones(5), np.ones(5)) == 0.0 and nrmse(np.ones(5), np.ones(5) * 1.1) == float("inf")


def test_segmentation_gates_on_pixel_agreement():
    ref = RNG.normal(size=(2, 3, 4, 4))
    out = ref.copy()
    out[0, :, 0, 0] = out[0, ::-1, 0, 0] + [10, 0, -10]  # change one pixel's class
    f = measure(TaskSpec("segmentation", ""), ref, out)
    changed = float((ref.argmax(1) != out.argmax(1)).mean())
    assert f.metric == "pixel_disagreement" and f.loss == pytest.approx(changed) and changed == pytest.approx(1 / 32)


def test_non_finite_and_misshapen_candidates_fail_the_gate():
    spec = TaskSpec("regression", "")
    bad = np.array([[1.0, np.nan]])
    f = measure(spec, np.ones((1, 2)), bad)
    assert f.loss == float("inf")
    ok, why = gate(f, Budget("regression", 0.05, "nrmse"))
    assert not ok and "NaN" in why
    ok, why = gate(measure(spec, np.ones((2, 2)), np.ones((2, 3))), Budget("regression", 0.05, "nrmse"))
    assert not ok and "shape" in why


# ------------------------------------------------------------------ detection decode, NMS, agreement


def test_decode_keeps_the_confident_box_and_suppresses_its_duplicate():
    h = _yolo_head(n=1)
    h[0, :4, 1] = [102, 101, 40, 40]  # a near-duplicate of box 0 ...
    h[0, 5, 1] = 0.9  # ... same class, lower score
    dets = decode(h, detection_layout(h))[0]
    assert len(dets.scores) == 1 and dets.classes[0] == 1 and dets.scores[0] == pytest.approx(0.95)
    assert np.allclose(dets.boxes[0], [80, 80, 120, 120])


@pytest.mark.parametrize("objectness,channels_first", [(False, True), (True, False)])
def test_identical_heads_agree_and_zeroed_scores_do_not(objectness, channels_first):
    h = _yolo_head(n=3, objectness=objectness, channels_first=channels_first)
    layout = detection_layout(h)
    same = box_agreement(h, h.copy(), layout)
    assert same["box_agreement"] == 1.0 and same["boxes_reference"] == 3
    dead = h.copy()
    if channels_first:
        dead[:, 4:, :] = 0.0  # the YOLO Concat trap: one scale rounds every score to 0
    else:
        dead[:, :, 4:] = 0.0
    f = measure(TaskSpec("detection", "", layout), h, dead)
    assert f.details["box_agreement"] == 0.0 and f.loss == 1.0
    assert f.details["cosine_min"] > 0.99  # why output cosine is no gate for a detector


def test_shifted_box_and_wrong_class_are_misses():
    h = _yolo_head(n=1)
    layout = detection_layout(h)
    moved = h.copy()
    moved[0, 0, 0] += 30  # IoU of two 40x40 boxes 30 px apart is 1/7
    assert box_agreement(h, moved, layout, conf=0.25)["box_agreement"] == 0.0
    relabel = h.copy()
    relabel[0, 5, 0], relabel[0, 6, 0] = 0.0, 0.95
    assert box_agreement(h, relabel, layout, conf=0.25)["box_agreement"] == 0.0
    nudged = h.copy()
    nudged[0, 0, 0] += 2
    nudged[0, 5, 0] = 0.9
    d = box_agreement(h, nudged, layout, conf=0.25)
    assert d["box_agreement"] == 1.0 and d["score_error_mean"] == pytest.approx(0.05, abs=1e-6) and d["matched_iou_mean"] > 0.9


def test_both_finding_nothing_agree():
    h = _yolo_head(n=2)
    h[:, 4:, :] = 0.0
    assert box_agreement(h, h, detection_layout(h))["box_agreement"] == 1.0


# ------------------------------------------------------------------ budget and gate


class _Profile:
    max_drop, min_box_agreement, min_cosine, max_nrmse = 0.02, 0.85, 0.995, 0.1


@pytest.mark.parametrize("task,metric,limit", [("classification", "top1_disagreement", 0.02), ("detection", "box_disagreement", 0.15),
                                               ("embedding", "cosine_gap", 0.005), ("regression", "nrmse", 0.1),
                                               ("segmentation", "pixel_disagreement", 0.02)])
def test_profile_fields_become_one_limit_per_task(task, metric, limit):
    b = Budget.from_profile(_Profile(), TaskSpec(task, ""))
    assert b.metric == metric and b.max_loss == pytest.approx(limit)
    assert Budget.from_profile(_Profile(), TaskSpec(task, ""), max_drop=0.3).max_loss == 0.3


def test_labelled_classification_gates_the_accuracy_drop():
    b = Budget.from_profile(None, TaskSpec("classification", ""), labelled=True, reference_accuracy=0.97)
    assert b.metric == "accuracy_drop" and b.max_loss == 0.01 and "original 0.9700" in b.describe()
    assert gate(Fidelity("classification", "accuracy_drop", 0.01), b) == (True, "")
    ok, why = gate(Fidelity("classification", "accuracy_drop", 0.0101), b)
    assert not ok and "accuracy drop 0.0101 > 0.01" in why
