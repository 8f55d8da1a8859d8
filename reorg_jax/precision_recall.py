"""Precision and recall at a confidence threshold, from an evaluated ``COCOeval``.

Glossary: ``C`` classes, ``n`` a class's scored detections, ``U`` distinct scores.

The YOLO family reports P and R at one confidence threshold shared by all
classes. :func:`best_f1` finds the one that maximises the mean F1 over the
classes with ground truth (searched exactly over all detection scores) and
gives the means there; :func:`class_metrics` gives each class's row at that
threshold, with its APs from COCO's precision array. Both count what COCO
scored at IoU 0.5 in the area range ``all`` with the largest detection cap
(:func:`class_matches`).
"""

from __future__ import annotations

import numpy as np
from pycocotools.cocoeval import COCOeval

__all__ = ['CLASS_METRIC_NAMES', 'best_f1', 'class_matches', 'class_metrics']

# Keys of each class's entry in :func:`class_metrics`, in order.
CLASS_METRIC_NAMES = ('labels', 'precision', 'recall', 'map50', 'map50_95')


def class_matches(coco_eval: COCOeval) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
  """Per class: its scored detections' ``[n]`` scores, ``[n]`` hits at IoU 0.5, ground-truth count.

  The detections and ground truth :func:`best_f1` counts: area range ``all``,
  the largest detection cap, ignored detections left out.
  """
  params = coco_eval.params
  iou_index = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
  all_area, cap = params.areaRng[0], params.maxDets[-1]
  scores: dict[int, list[np.ndarray]] = {}
  hits: dict[int, list[np.ndarray]] = {}
  num_gt: dict[int, int] = {}
  for entry in coco_eval.evalImgs:
    if entry is None or entry['aRng'] != all_area or entry['maxDet'] != cap:
      continue
    category = entry['category_id']
    kept = ~entry['dtIgnore'][iou_index].astype(bool)  # [D]
    scores.setdefault(category, []).append(np.asarray(entry['dtScores'], np.float64)[kept])
    hits.setdefault(category, []).append(entry['dtMatches'][iou_index][kept] > 0)
    num_gt[category] = num_gt.get(category, 0) + int((entry['gtIgnore'] == 0).sum())
  return {
    category: (np.concatenate(scores[category]), np.concatenate(hits[category]), num_gt[category])
    for category in sorted(num_gt)
  }


def class_metrics(coco_eval: COCOeval, *, threshold: float) -> dict[int, dict[str, float]]:
  """Per class with ground truth: its label count, P and R at ``threshold``, and its two APs.

  The per-class rows of the all-class numbers: the mean over these classes of
  ``precision``, ``recall``, ``map50`` and ``map50_95`` is :func:`best_f1`'s
  ``precision`` and ``recall`` (at its ``f1_threshold``) and COCO's
  ``map50`` and ``map50_95`` (up to rounding in the last bit).

  Args:
    coco_eval: a ``COCOeval`` after ``evaluate()`` and ``accumulate()``; the
      area range ``all`` and the largest detection cap are used.
    threshold: the confidence shared by all classes (:func:`best_f1`'s
      ``f1_threshold``): detections scoring at or above it count for P and R.
      NaN (nothing was detected): P and R are 0.

  Returns:
    Class (COCO category id) -> floats keyed by :data:`CLASS_METRIC_NAMES`:
    ``labels`` (ground-truth boxes), ``precision`` and ``recall`` at IoU 0.5
    (precision 0 when no detection of the class reaches ``threshold``),
    ``map50`` and ``map50_95`` (the class's AP at IoU 0.5 and averaged over
    IoU 0.5:0.95, from COCO's ``[iou, recall, class, area, cap]`` precision
    array). Classes in increasing order; a class without ground truth is
    left out, as in every COCO mean.
  """
  params = coco_eval.params
  precision_array = coco_eval.eval['precision']  # [iou, recall, class, area, cap]
  area = list(params.areaRngLbl).index('all')
  iou50 = np.flatnonzero(np.isclose(params.iouThrs, 0.5))

  def mean(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else float('nan')

  rows = {}
  for category, (scores, hits, num_gt) in class_matches(coco_eval).items():
    if num_gt == 0:
      continue
    counted = scores >= threshold  # [n]; all False when threshold is NaN
    kept, tp = int(counted.sum()), int(hits[counted].sum())
    values = precision_array[:, :, list(params.catIds).index(category), area, -1]  # [iou, recall]
    rows[category] = {
      'labels': float(num_gt),
      'precision': tp / kept if kept else 0.0,
      'recall': tp / num_gt,
      'map50': mean(values[iou50]),
      'map50_95': mean(values),
    }
  return rows


def best_f1(coco_eval: COCOeval) -> dict[str, float]:
  """Precision, recall and F1 at IoU 0.5 at the confidence maximising mean F1.

  Args:
    coco_eval: a ``COCOeval`` after ``evaluate()`` (its ``evalImgs``); uses
      the area range ``all`` and the largest detection cap.

  Returns:
    ``precision``, ``recall``, ``f1`` (means over classes with ground truth)
    and ``f1_threshold`` (the score threshold; detections with a score at or
    above it count). Ties go to the highest threshold. NaN everywhere when no
    class has ground truth; 0 (threshold NaN) when nothing was detected.
  """
  matches = class_matches(coco_eval)
  num_gt = {category: count for category, (_, _, count) in matches.items()}
  counted = [c for c in sorted(num_gt) if num_gt[c] > 0]
  if not counted:
    return {name: float('nan') for name in ('precision', 'recall', 'f1', 'f1_threshold')}
  all_scores = np.concatenate([matches[c][0] for c in counted])
  if all_scores.size == 0:
    return {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'f1_threshold': float('nan')}

  thresholds = np.unique(all_scores)[::-1]  # [U], descending
  precision_sum = np.zeros(thresholds.size)
  recall_sum = np.zeros(thresholds.size)
  f1_sum = np.zeros(thresholds.size)
  for category in counted:
    class_scores, hits, _ = matches[category]
    order = np.argsort(-class_scores, kind='stable')
    tp = np.concatenate([[0], np.cumsum(hits[order])])  # [n + 1]
    kept = np.searchsorted(-class_scores[order], -thresholds, side='right')  # [U] dets >= t
    precision = np.divide(tp[kept], kept, out=np.zeros(thresholds.size), where=kept > 0)
    recall = tp[kept] / num_gt[category]
    both = precision + recall
    precision_sum += precision
    recall_sum += recall
    f1_sum += np.divide(2 * precision * recall, both, out=np.zeros(thresholds.size), where=both > 0)
  best = int(np.argmax(f1_sum))  # first maximum: the highest threshold
  return {
    'precision': float(precision_sum[best] / len(counted)),
    'recall': float(recall_sum[best] / len(counted)),
    'f1': float(f1_sum[best] / len(counted)),
    'f1_threshold': float(thresholds[best]),
  }
