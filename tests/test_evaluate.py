"""COCO metrics: known cases by hand, and agreement with ``pycocotools`` called directly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from reorg_jax import evaluate
from reorg_jax.targets import Targets

H, W = 320, 480


def _targets(boxes_xyxy: list[list[list[float]]], classes: list[list[int]], *, hw=(H, W)):
  """Padded ``Targets`` from per-image pixel corner boxes."""
  height, width = hw
  size = max(1, max(len(b) for b in boxes_xyxy))
  boxes = np.zeros((len(boxes_xyxy), size, 4), np.float32)
  labels = np.zeros((len(boxes_xyxy), size), np.int32)
  valid = np.zeros((len(boxes_xyxy), size), bool)
  for i, (image_boxes, image_classes) in enumerate(zip(boxes_xyxy, classes, strict=True)):
    for j, ((x1, y1, x2, y2), c) in enumerate(zip(image_boxes, image_classes, strict=True)):
      boxes[i, j] = [
        (x1 + x2) / 2 / width,
        (y1 + y2) / 2 / height,
        (x2 - x1) / width,
        (y2 - y1) / height,
      ]
      labels[i, j], valid[i, j] = c, True
  return Targets(boxes=boxes, classes=labels, valid=valid)


def _detections(boxes_xyxy, scores, classes, *, size: int = 8):
  """Padded detection arrays ``[B, size, ...]`` from per-image lists."""
  batch = len(boxes_xyxy)
  boxes = np.zeros((batch, size, 4), np.float32)
  out_scores = np.zeros((batch, size), np.float32)
  out_classes = np.full((batch, size), -1, np.int32)
  valid = np.zeros((batch, size), bool)
  for i in range(batch):
    n = len(boxes_xyxy[i])
    boxes[i, :n] = np.reshape(boxes_xyxy[i], (n, 4))
    out_scores[i, :n], out_classes[i, :n], valid[i, :n] = scores[i], classes[i], True
  return {'boxes': boxes, 'scores': out_scores, 'classes': out_classes, 'valid': valid}


GT = [[[40, 30, 140, 130], [200, 100, 300, 260]], [[10, 10, 110, 50]], []]
GT_CLASSES = [[0, 1], [0], []]


def _evaluate(detections, targets, *, num_classes=3, hw=(H, W), **kwargs):
  evaluator = evaluate.DetectionEvaluator(num_classes=num_classes)
  evaluator.add_batch(**detections, targets=targets, image_hw=hw, **kwargs)
  return evaluator.compute()


def test_perfect_predictions_score_one(capsys):
  scores = [[0.9, 0.8], [0.7], []]
  metrics = _evaluate(_detections(GT, scores, GT_CLASSES), _targets(GT, GT_CLASSES))
  for name in ('map50_95', 'map50', 'map75', 'ar', 'precision', 'recall', 'f1'):
    assert metrics[name] == pytest.approx(1.0), name
  assert metrics['map_small'] != metrics['map_small']  # no small boxes: NaN, not 0
  assert (metrics['num_images'], metrics['num_targets'], metrics['num_detections']) == (3, 3, 3)
  assert capsys.readouterr().out == ''  # pycocotools kept quiet


def test_non_square_frame_uses_height_and_width():
  boxes, classes = [[[300, 20, 460, 120]]], [[0]]
  detections = _detections(boxes, [[0.9]], classes)
  assert _evaluate(detections, _targets(boxes, classes))['map50_95'] == pytest.approx(1.0)
  swapped = _targets(boxes, classes, hw=(W, H))  # normalised against the wrong axes
  assert _evaluate(detections, swapped)['map50'] == 0.0


def test_detections_are_clipped_to_the_frame():
  gt = [[[400, 200, 480, 320]]]  # against the right and bottom border
  beyond = [[[400, 200, 540, 380]]]  # IoU 0.38 unclipped, 1 once clipped
  metrics = _evaluate(_detections(beyond, [[0.9]], [[0]]), _targets(gt, [[0]]))
  assert metrics['map50_95'] == pytest.approx(1.0)


@pytest.mark.parametrize(
  'shift, map50, map50_95',
  [
    (20, 1.0, 0.4),  # IoU 80/120 = 0.667: matched at 0.50 .. 0.65
    (5, 1.0, 0.9),  # IoU 95/105 = 0.905: matched at 0.50 .. 0.90
    (40, 0.0, 0.0),  # IoU 60/140 = 0.429: never matched
  ],
)
def test_shifted_box_scores_by_iou(shift, map50, map50_95):
  gt = [[[100, 100, 200, 200]]]
  shifted = [[[100 + shift, 100, 200 + shift, 200]]]
  metrics = _evaluate(_detections(shifted, [[0.9]], [[0]]), _targets(gt, [[0]]))
  assert metrics['map50'] == pytest.approx(map50)
  assert metrics['map50_95'] == pytest.approx(map50_95)


def test_no_predictions_score_zero():
  metrics = _evaluate(
    _detections([[], [], []], [[], [], []], [[], [], []]), _targets(GT, GT_CLASSES)
  )
  for name in ('map50_95', 'map50', 'ar', 'precision', 'recall', 'f1'):
    assert metrics[name] == 0.0, name
  assert metrics['f1_threshold'] != metrics['f1_threshold']


def test_empty_dataset_is_nan():
  empty = evaluate.DetectionEvaluator(num_classes=2).compute()
  assert set(empty) == set(evaluate.METRIC_NAMES)
  assert all(np.isnan(empty[name]) for name in evaluate.METRIC_NAMES if not name.startswith('num'))
  assert empty['num_images'] == 0
  # Images without ground truth, with and without detections: still undefined, counted.
  no_gt = _evaluate(
    _detections([[[0, 0, 10, 10]], []], [[0.5], []], [[1], []]), _targets([[], []], [[], []])
  )
  assert np.isnan(no_gt['map50']) and (no_gt['num_images'], no_gt['num_detections']) == (2, 1)


def test_class_confusion():
  scores = [[0.9, 0.8], [0.7], []]
  swapped = [[1, 0], [1], []]  # right boxes, wrong classes
  metrics = _evaluate(_detections(GT, scores, swapped), _targets(GT, GT_CLASSES))
  assert metrics['map50'] == 0.0 and metrics['precision'] == 0.0
  half = [[0, 2], [0], []]  # class 1 predicted as 2 (which has no ground truth: left out)
  metrics = _evaluate(_detections(GT, scores, half), _targets(GT, GT_CLASSES))
  assert metrics['map50'] == pytest.approx(0.5)  # class 0: AP 1, class 1: AP 0
  assert metrics['recall'] == pytest.approx(0.5)


def test_hand_computed_ap_and_best_f1():
  # One class, 3 boxes over 2 images; detections by score: TP, FP, TP, FP.
  gt = [[[0, 0, 50, 50], [100, 100, 150, 150]], [[0, 0, 60, 60]]]
  det = [[[0, 0, 50, 50], [200, 200, 250, 250], [100, 100, 150, 150]], [[100, 0, 160, 60]]]
  scores = [[0.9, 0.8, 0.7], [0.6]]
  metrics = _evaluate(_detections(det, scores, [[0, 0, 0], [0]]), _targets(gt, [[0, 0], [0]]))
  # Precision envelope: 1 up to recall 1/3 (34 of COCO's 101 points), 2/3 up to 2/3 (33 points).
  assert metrics['map50'] == pytest.approx((34 + 33 * 2 / 3) / 101)
  assert metrics['map50_95'] == pytest.approx(metrics['map50'])
  # F1 per threshold: 0.9 -> 1/2, 0.8 -> 2/5, 0.7 -> 2/3, 0.6 -> 4/7.
  assert metrics['f1'] == pytest.approx(2 / 3)
  assert (metrics['precision'], metrics['recall']) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
  assert metrics['f1_threshold'] == pytest.approx(0.7)


def test_matches_pycocotools_on_its_own_json():
  rng = np.random.default_rng(0)
  batch, num_gt, num_det, num_classes = 6, 7, 20, 4
  xy = rng.uniform(0, [W - 120, H - 120], (batch, num_gt, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, 120, (batch, num_gt, 2))], -1)
  gt_classes = rng.integers(0, num_classes, (batch, num_gt))
  gt_valid = rng.random((batch, num_gt)) < 0.7
  pick = rng.integers(0, num_gt, (batch, num_det))
  det = np.take_along_axis(gt, pick[..., None], 1) + rng.normal(0, 6, (batch, num_det, 4))
  det[..., 2:] = np.maximum(det[..., 2:], det[..., :2] + 1)
  det_classes = np.where(
    rng.random((batch, num_det)) < 0.8,
    np.take_along_axis(gt_classes, pick, 1),
    rng.integers(0, num_classes, (batch, num_det)),
  )
  targets = _targets(
    [g[v].tolist() for g, v in zip(gt, gt_valid, strict=True)],
    [c[v].tolist() for c, v in zip(gt_classes, gt_valid, strict=True)],
  )
  evaluator = evaluate.DetectionEvaluator(num_classes=num_classes)
  for half in (slice(0, 3), slice(3, 6)):  # two batches
    evaluator.add_batch(
      boxes=det[half],
      scores=rng.random((3, num_det)),
      classes=det_classes[half],
      valid=rng.random((3, num_det)) < 0.9,
      targets=Targets(
        *(np.asarray(a)[half] for a in (targets.boxes, targets.classes, targets.valid))
      ),
      image_hw=(H, W),
    )
  metrics = evaluator.compute()
  assert 0.1 < metrics['map50_95'] < metrics['map50'] < 1

  ground_truth, results = evaluator.coco_json()
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    reference = COCOeval(coco, coco.loadRes(results), iouType='bbox')
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
  ours = [metrics[name] for name in evaluate.METRIC_NAMES[:12]]
  np.testing.assert_allclose(ours, reference.stats, rtol=1e-12)


def test_padding_images_are_skipped():
  scores = [[0.9, 0.8], [0.7], []]
  detections = _detections(GT, scores, GT_CLASSES)
  detections['classes'][1, 0] = 1  # image 1 wrong, but it is padding
  metrics = _evaluate(detections, _targets(GT, GT_CLASSES), real=np.array([True, False, True]))
  assert metrics['map50_95'] == pytest.approx(1.0)
  assert (metrics['num_images'], metrics['num_targets']) == (2, 2)


def test_clear_errors():
  detections = _detections(GT, [[0.9, 0.8], [0.7], []], GT_CLASSES)
  targets = _targets(GT, GT_CLASSES)
  evaluator = evaluate.DetectionEvaluator(num_classes=2)
  with pytest.raises(ValueError, match=r'scores must have shape \(3, 8\)'):
    evaluator.add_batch(
      **{**detections, 'scores': detections['scores'][:, :4]}, targets=targets, image_hw=(H, W)
    )
  bad = {**detections, 'classes': np.where(detections['valid'], 5, -1)}
  with pytest.raises(ValueError, match=r'detection classes must be integers in \[0, 2\)'):
    evaluator.add_batch(**bad, targets=targets, image_hw=(H, W))
  inverted = {**detections, 'boxes': detections['boxes'][..., [2, 1, 0, 3]]}
  with pytest.raises(ValueError, match='x2 < x1'):
    evaluator.add_batch(**inverted, targets=targets, image_hw=(H, W))
  assert evaluator.num_images == 0  # nothing half-added
  with pytest.raises(ValueError, match='max_detections'):
    evaluate.DetectionEvaluator(num_classes=2, max_detections=5)


def test_takes_predict_output_directly():
  from reorg_jax.models import inference as predict

  labels = np.array(
    [[0, 0, 0.25, 0.5, 0.2, 0.3], [0, 2, 0.7, 0.4, 0.1, 0.2], [1, 1, 0.5, 0.5, 0.4, 0.4]]
  )
  targets = Targets.from_yolo(labels, batch_size=2, max_boxes=4, num_classes=3)
  # Decoded head outputs [B, N, 5 + C]: the true boxes (pixels) among low-confidence noise.
  decoded = np.zeros((2, 16, 8), np.float32)
  decoded[..., :4] = [W / 2, H / 2, 10, 10]
  decoded[..., 4] = 0.01
  for image, cls, cx, cy, w, h in labels:
    slot = int(cls) + 3
    decoded[int(image), slot, :5] = [cx * W, cy * H, w * W, h * H, 0.9]
    decoded[int(image), slot, 5 + int(cls)] = 1.0
  detections = predict.select_detections(
    decoded,
    max_detections=8,
    max_candidates=16,
    score_threshold=0.001,
    iou_threshold=0.65,
    class_agnostic=False,
  )
  evaluator = evaluate.DetectionEvaluator(num_classes=3)
  evaluator.add_batch(
    boxes=detections.boxes,
    scores=detections.scores,
    classes=detections.classes,
    valid=detections.valid,
    targets=targets,
    image_hw=(H, W),
  )
  metrics = evaluator.compute()
  assert metrics['map50_95'] == pytest.approx(1.0)
  assert metrics['num_detections'] == 3
