"""Decoding YOLO-style raw detector heads, NMS, and matched-box agreement between two models.

A raw head gives, per image, ``A`` candidate boxes ``(cx, cy, w, h)`` with class scores (and,
YOLOv5-style, an objectness score multiplying them). Decoding keeps boxes whose best class
score reaches the confidence threshold, then class-aware non-maximum suppression keeps the
best of each overlapping group, as the model's users do before reading any box.

Two models agree on an image's detections when each box of one has a box of the other of the
same class with IoU >= 0.5 (greedy, best score first). The agreement is the F1 of that
matching, ``2 * matched / (boxes of the reference + boxes of the candidate)``, so missed boxes
and invented ones both count; two models that both find nothing agree.

Public API: :class:`Detections`, :func:`decode`, :func:`nms`, :func:`match`, :func:`box_agreement`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Detections", "decode", "nms", "match", "box_agreement", "iou_matrix"]

CONF_THRESHOLD = 0.25  # ultralytics' predict default
IOU_NMS = 0.45
IOU_MATCH = 0.5
MAX_PRE_NMS = 1000
MAX_DETECTIONS = 300


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [K, 4] x1, y1, x2, y2
    scores: np.ndarray  # [K]
    classes: np.ndarray  # [K] int


def _rows(raw: np.ndarray, layout: dict[str, Any]) -> np.ndarray:
    """``[N, A, ch]`` float64 view of a raw head in either layout."""
    a = np.asarray(raw, dtype=np.float64)
    return np.moveaxis(a, 1, 2) if layout["layout"] == "channels_first" else a


def class_scores(raw: np.ndarray, layout: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy [N, A, 4], best score [N, A], best class [N, A]); NaN/inf count as score 0."""
    r = _rows(raw, layout)
    cx, cy, w, h = (r[..., k] for k in range(4))
    w, h = np.maximum(w, 0), np.maximum(h, 0)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    cls = r[..., 5:] * r[..., 4:5] if layout["objectness"] else r[..., 4:]
    cls = np.where(np.isfinite(cls), cls, 0.0)
    best = cls.argmax(-1)
    score = np.take_along_axis(cls, best[..., None], -1)[..., 0]
    boxes = np.where(np.isfinite(boxes), boxes, 0.0)
    return boxes, score, best


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [K, 4] with every box of ``b`` [M, 4] (xyxy); 0 where a box has no area."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, iou: float = IOU_NMS, limit: int = MAX_DETECTIONS) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, best score first."""
    order = np.argsort(-scores, kind="stable")[:MAX_PRE_NMS]
    keep: list[int] = []
    while len(order) and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not len(rest):
            break
        overlap = iou_matrix(boxes[i:i + 1], boxes[rest])[0]
        order = rest[(overlap <= iou) | (classes[rest] != classes[i])]
    return np.asarray(keep, dtype=np.int64)


def decode(raw: np.ndarray, layout: dict[str, Any], *, conf: float = CONF_THRESHOLD) -> list[Detections]:
    """Per image, the boxes a user of the model sees: confidence threshold, then NMS."""
    boxes, score, best = class_scores(raw, layout)
    out = []
    for n in range(len(boxes)):
        sel = np.flatnonzero(score[n] >= conf)
        b, s, c = boxes[n][sel], score[n][sel], best[n][sel]
        k = nms(b, s, c)
        out.append(Detections(b[k], s[k], c[k]))
    return out


def match(ref: Detections, cand: Detections, *, iou: float = IOU_MATCH) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, reference boxes by descending score: ``[(ref index, cand index, IoU)]``."""
    m = iou_matrix(ref.boxes, cand.boxes)
    if m.size:
        m = np.where(ref.classes[:, None] == cand.classes[None, :], m, 0.0)
    used: set[int] = set()
    pairs = []
    for i in np.argsort(-ref.scores, kind="stable"):
        if not m.shape[1]:
            break
        row = m[i].copy()
        if used:
            row[list(used)] = 0.0
        j = int(row.argmax())
        if row[j] >= iou:
            used.add(j)
            pairs.append((int(i), j, float(row[j])))
    return pairs


def adaptive_conf(ref_raw: np.ndarray, layout: dict[str, Any], *, floor: float = 0.05) -> float:
    """The confidence threshold for the comparison: the usual 0.25, lowered (not below ``floor``)
    until the reference finds about one box per image, so a gate on data the model sees little
    in still compares real boxes instead of agreeing vacuously on nothing."""
    _, score, _ = class_scores(ref_raw, layout)
    n = len(score)
    flat = np.sort(score.reshape(-1))[::-1]
    if (flat >= CONF_THRESHOLD).sum() >= n or not len(flat):
        return CONF_THRESHOLD
    return float(max(floor, min(CONF_THRESHOLD, flat[min(n, len(flat)) - 1])))


def box_agreement(ref_raw: np.ndarray, cand_raw: np.ndarray, layout: dict[str, Any], *, conf: float | None = None) -> dict[str, float]:
    """Matched-box agreement (F1), mean matched IoU and mean score error over a batch of images."""
    conf = adaptive_conf(ref_raw, layout) if conf is None else conf
    refs, cands = decode(ref_raw, layout, conf=conf), decode(cand_raw, layout, conf=conf)
    matched = n_ref = n_cand = 0
    ious: list[float] = []
    score_err: list[float] = []
    for r, c in zip(refs, cands):
        pairs = match(r, c)
        matched += len(pairs)
        n_ref += len(r.scores)
        n_cand += len(c.scores)
        ious += [p[2] for p in pairs]
        score_err += [abs(float(r.scores[i] - c.scores[j])) for i, j, _ in pairs]
    total = n_ref + n_cand
    return {"box_agreement": 2.0 * matched / total if total else 1.0, "boxes_reference": float(n_ref), "boxes_candidate": float(n_cand),
            "boxes_matched": float(matched), "matched_iou_mean": float(np.mean(ious)) if ious else 0.0,
            "score_error_mean": float(np.mean(score_err)) if score_err else 0.0, "conf_threshold": conf}
