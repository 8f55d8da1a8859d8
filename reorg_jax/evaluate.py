"""COCO detection metrics from fixed-shape detections and padded ground truth.

Glossary: ``B`` batch, ``D`` detections per image (padded), ``M`` max boxes
per image (padded ground truth), ``G`` valid ground-truth boxes of an image,
``C`` classes, ``H``/``W`` network input height and width in pixels.

:class:`DetectionEvaluator` collects batches on the host and scores them with
``pycocotools`` (``COCOeval``, box IoU), building the COCO structures in
memory. Detections are the padded output of non-maximum suppression (as
:func:`reorg_jax.models.inference.predict` returns them: ``boxes [B, D, 4]`` corners in
input pixels, ``scores [B, D]``, ``classes [B, D]``, ``valid [B, D]``); ground
truth is a :class:`reorg_jax.Targets` (normalised centre/size) turned into
pixels of the same ``H x W`` input frame. Both become COCO's ``bbox``
``[x, y, w, h]`` (top-left and size) through :mod:`reorg_jax.boxes`.

Conventions:

* Class ``c`` is COCO category ``c``; images and annotations are numbered
  from 1 in the order they are added (``COCOeval`` treats id 0 as "unmatched").
* Detection boxes are clipped to the ``H x W`` frame (the original clips to
  the image before scoring). Every ground-truth box counts (``iscrowd = 0``).
* Scoring happens in the input frame. IoU does not change under the
  letterbox's uniform scale and shift, so the mAPs equal those in the
  original image frame (up to clipping at the padded rather than the image
  border); only the small/medium/large split, which uses absolute areas
  (``w * h`` in input pixels), refers to the input frame.
* As in ``pycocotools``, a class without ground truth is left out of every
  mean, and its detections count nowhere. A value that is undefined (no
  ground truth at all, or none in an area range) is NaN, never 0: an empty
  dataset gives NaN for every metric. With ground truth but no detections,
  the mAPs are 0.
* ``precision``/``recall``/``f1`` are at IoU 0.5 over the detections COCO
  scores (at most ``max_detections`` per image and class), at one confidence
  threshold shared by all classes: the one that maximises the mean F1 over
  classes with ground truth (the YOLO family reports P and R this way). The
  threshold is searched exactly over all detection scores; a class with no
  detection at or above it has precision 0. With no detections, all three
  are 0 and the threshold is NaN. (The original's ``test.py`` interpolates on
  a 1000-point grid and gives such a class precision 1, so its P can be
  slightly higher.)
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from reorg_jax import boxes as box_lib
from reorg_jax import targets as targets_lib
from reorg_jax.precision_recall import CLASS_METRIC_NAMES, best_f1, class_metrics

__all__ = [
  'CLASS_METRIC_NAMES',
  'METRIC_NAMES',
  'DetectionEvaluator',
  'best_f1',
  'class_metrics',
  'coco_metrics',
  'coco_summary',
  'compute_by_class',
]

# Keys of :meth:`DetectionEvaluator.compute`, in order. ``ar1``/``ar10``/``ar``
# are average recalls with at most 1, 10 and ``max_detections`` detections
# per image; the ``map*`` values also use ``max_detections``.
METRIC_NAMES = (
  'map50_95',
  'map50',
  'map75',
  'map_small',
  'map_medium',
  'map_large',
  'ar1',
  'ar10',
  'ar',
  'ar_small',
  'ar_medium',
  'ar_large',
  'precision',
  'recall',
  'f1',
  'f1_threshold',
  'num_images',
  'num_targets',
  'num_detections',
)


def _summary(coco_eval: COCOeval) -> dict[str, float]:
  """The twelve COCO numbers from ``coco_eval.eval``; NaN where undefined.

  Computed here rather than by ``COCOeval.summarize``, which prints and
  hard-codes 100 detections for its first value.
  """
  params = coco_eval.params
  # Axes: IoU thresholds, recall points, classes, area ranges, detection caps.
  precision = coco_eval.eval['precision']  # [iou, recall, class, area, cap]
  recall = coco_eval.eval['recall']  # [iou, class, area, cap]
  areas = {label: i for i, label in enumerate(params.areaRngLbl)}

  def mean(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else float('nan')

  def ap(*, iou: float | None = None, area: str = 'all') -> float:
    values = precision[..., areas[area], -1]  # [iou, recall, class]
    if iou is not None:
      values = values[np.flatnonzero(np.isclose(params.iouThrs, iou))]
    return mean(values)

  def ar(*, cap: int = -1, area: str = 'all') -> float:
    return mean(recall[:, :, areas[area], cap])

  return {
    'map50_95': ap(),
    'map50': ap(iou=0.5),
    'map75': ap(iou=0.75),
    'map_small': ap(area='small'),
    'map_medium': ap(area='medium'),
    'map_large': ap(area='large'),
    'ar1': ar(cap=0),
    'ar10': ar(cap=1),
    'ar': ar(),
    'ar_small': ar(area='small'),
    'ar_medium': ar(area='medium'),
    'ar_large': ar(area='large'),
  }


def _check_max_detections(max_detections: int) -> None:
  if max_detections < 10:
    raise ValueError(
      f'max_detections must be at least 10 (COCO also reports recall at 1 and 10 detections), '
      f'got {max_detections}'
    )


def _check_boxes(boxes: np.ndarray, scores: np.ndarray) -> None:
  """Raises ``ValueError`` for non-finite or inverted ``[D, 4]`` boxes or non-finite scores."""
  if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
    raise ValueError('valid detection boxes or scores contain NaN or inf')
  inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
  if inverted.any():
    raise ValueError(
      f'{inverted.sum()} detection box(es) have x2 < x1 or y2 < y1 (expected corners '
      f'x1, y1, x2, y2), first: {boxes[np.argmax(inverted)].tolist()}'
    )


def _coco(dataset: dict[str, Any]) -> COCO:
  """An in-memory ``COCO`` index of ``dataset`` (quietly)."""
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_metrics(
  ground_truth: dict[str, Any],
  detections: list[dict[str, Any]],
  *,
  max_detections: int,
  verbose: bool,
) -> dict[str, float]:
  """Runs ``COCOeval`` (box IoU) on COCO structures held in memory.

  Args:
    ground_truth: a COCO dataset dict (``images``, ``annotations`` with
      ``id`` from 1, ``bbox``, ``area``, ``iscrowd``; ``categories``).
    detections: COCO result dicts (``image_id``, ``category_id``, ``bbox``
      ``[x, y, w, h]``, ``score``); may be empty.
    max_detections: detections per image scored (COCO uses 100; at least 10).
    verbose: let ``pycocotools`` print its progress and summary table (its
      table's first line assumes 100 detections; the returned values do not).

  Returns:
    The twelve COCO numbers and :func:`best_f1`'s four, keyed as in
    :data:`METRIC_NAMES` (without the counts).
  """
  coco_eval = _evaluated(ground_truth, detections, max_detections=max_detections, verbose=verbose)
  return {**_summary(coco_eval), **best_f1(coco_eval)}


class DetectionEvaluator:
  """Accumulates detections and ground truth batch by batch; :meth:`compute` scores them.

  Everything is copied to the host as NumPy on :meth:`add_batch`; COCO
  structures are built only in :meth:`coco_json` / :meth:`compute`. Images
  without ground truth or without detections are fine (a detection on an
  image without ground truth of its class is a false positive).

  Usage::

    evaluator = DetectionEvaluator(num_classes=80)
    for batch in loader.epoch(0):
      images = unit_images(batch.images)  # from reorg_jax.models.yolo
      det = predict.predict(model, variables, images, score_threshold=0.001, iou_threshold=0.65)
      evaluator.add_batch(
        boxes=det.boxes, scores=det.scores, classes=det.classes, valid=det.valid,
        targets=batch.targets, image_hw=images.shape[1:3], real=batch.real,
      )
    metrics = evaluator.compute()  # {'map50_95': ..., 'map50': ..., ...}

  Args:
    num_classes: ``C``; classes must lie in ``[0, C)``.
    max_detections: detections per image that COCO scores (its standard is
      100; the highest-scoring ones per image and class are kept).
    verbose: let ``pycocotools`` print progress and its summary table.
  """

  def __init__(self, *, num_classes: int, max_detections: int = 100, verbose: bool = False):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    _check_max_detections(max_detections)
    self.num_classes = num_classes
    self.max_detections = max_detections
    self.verbose = verbose
    self.reset()

  def reset(self) -> None:
    """Forgets every image added so far."""
    self._images: list[tuple[int, int]] = []  # (H, W) per image
    self._gt: list[tuple[int, np.ndarray, np.ndarray]] = []  # (image, [G, 4] xywh, [G] class)
    self._det: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # + [D] score

  @property
  def num_images(self) -> int:
    """Images added so far."""
    return len(self._images)

  def add_batch(
    self,
    *,
    boxes: Any,
    scores: Any,
    classes: Any,
    valid: Any,
    targets: targets_lib.Targets,
    image_hw: tuple[int, int],
    real: Any = None,
  ) -> None:
    """Adds one batch of detections and its ground truth.

    Args:
      boxes: ``[B, D, 4]`` detection corners ``x1, y1, x2, y2`` in input pixels
        (clipped to the frame here).
      scores: ``[B, D]`` confidences.
      classes: ``[B, D]`` integer classes (ignored where not ``valid``).
      valid: ``[B, D]`` bool, real detections (padding elsewhere).
      targets: ground truth, ``[B, M]`` boxes normalised to the input frame.
      image_hw: ``(H, W)`` of the network input the boxes refer to.
      real: optional ``[B]`` bool, images to keep (``False`` marks batch
        padding, e.g. ``Batch.real``); all images when ``None``.

    Raises:
      ValueError: naming the problem: mismatched shapes, a non-finite or
        inverted valid box, a non-finite score, or a class outside ``[0, C)``.
    """
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    classes = np.asarray(classes)
    valid = np.asarray(valid, bool)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
      raise ValueError(f'boxes must have shape [B, D, 4], got {boxes.shape}')
    shape = boxes.shape[:2]
    for name, array in (('scores', scores), ('classes', classes), ('valid', valid)):
      if array.shape != shape:
        raise ValueError(f'{name} must have shape {shape} like boxes [B, D], got {array.shape}')
    gt_boxes = np.asarray(targets.boxes, np.float64)  # [B, M, 4]
    gt_classes = np.asarray(targets.classes)  # [B, M]
    gt_valid = np.asarray(targets.valid, bool)  # [B, M]
    if gt_boxes.shape[0] != shape[0]:
      raise ValueError(f'targets hold {gt_boxes.shape[0]} images, detections {shape[0]}')
    real = np.ones(shape[0], bool) if real is None else np.asarray(real, bool)
    if real.shape != (shape[0],):
      raise ValueError(f'real must have shape [B] = ({shape[0]},), got {real.shape}')
    height, width = (int(v) for v in image_hw)
    if height < 1 or width < 1:
      raise ValueError(f'image_hw must be positive (H, W), got {tuple(image_hw)}')

    keep = valid & real[:, None]  # [B, D]
    _check_boxes(boxes[keep], scores[keep])
    self._check_classes(classes[keep], 'detection')
    self._check_classes(gt_classes[gt_valid & real[:, None]], 'ground-truth')

    boxes = box_lib.clip_xyxy(boxes, width=width, height=height, xp=np)
    for b in np.flatnonzero(real):
      self._images.append((height, width))
      image = len(self._images)  # COCO id, from 1
      xywh = box_lib.normalized_cxcywh_to_pixel_xywh(
        gt_boxes[b, gt_valid[b]], width=width, height=height, xp=np
      )  # [G, 4] pixels
      self._gt.append((image, xywh, gt_classes[b, gt_valid[b]].astype(np.int64)))
      xywh = box_lib.xyxy_to_xywh(boxes[b, valid[b]], xp=np)  # [D', 4] the valid ones
      self._det.append((image, xywh, classes[b, valid[b]].astype(np.int64), scores[b, valid[b]]))

  def _check_classes(self, classes: np.ndarray, what: str) -> None:
    """Raises ``ValueError`` unless ``classes`` are integers in ``[0, C)``."""
    if classes.size and (
      not np.all(classes == np.round(classes))
      or classes.min() < 0
      or classes.max() >= self.num_classes
    ):
      raise ValueError(
        f'{what} classes must be integers in [0, {self.num_classes}), '
        f'got values from {classes.min()} to {classes.max()}'
      )

  def coco_json(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The COCO structures of everything added, as ``pycocotools`` reads them.

    Returns:
      ``(ground_truth, detections)``: a COCO dataset dict (``images``,
      ``annotations``, ``categories``; ``json.dump``-able) and a list of
      result dicts (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
      ``score``), the form ``COCO.loadRes`` takes.
    """
    images = [{'id': i, 'height': h, 'width': w} for i, (h, w) in enumerate(self._images, start=1)]
    annotations = []
    for image, xywh, classes in self._gt:
      for box, category in zip(xywh.tolist(), classes.tolist(), strict=True):
        annotations.append(
          {
            'id': len(annotations) + 1,
            'image_id': image,
            'category_id': category,
            'bbox': box,
            'area': box[2] * box[3],
            'iscrowd': 0,
          }
        )
    detections = [
      {'image_id': image, 'category_id': category, 'bbox': box, 'score': score}
      for image, xywh, classes, scores in self._det
      for box, category, score in zip(xywh.tolist(), classes.tolist(), scores.tolist(), strict=True)
    ]
    categories = [{'id': c, 'name': str(c)} for c in range(self.num_classes)]
    return {'images': images, 'annotations': annotations, 'categories': categories}, detections

  def compute(self) -> dict[str, float]:
    """Scores everything added so far.

    Returns:
      Floats keyed by :data:`METRIC_NAMES`: COCO's ``map50_95`` (mAP@0.5:0.95),
      ``map50``, ``map75``, by area, average recalls, then ``precision``,
      ``recall``, ``f1`` and ``f1_threshold`` (see the module notes), and the
      counts ``num_images``, ``num_targets``, ``num_detections``. Undefined
      values are NaN (an empty dataset: all metrics NaN, counts 0).
    """
    return compute_by_class(self)[0]


def _evaluated(
  ground_truth: dict[str, Any],
  detections: list[dict[str, Any]],
  *,
  max_detections: int | None,
  verbose: bool = False,
) -> COCOeval:
  """A ``COCOeval`` (box IoU) of the structures, evaluated and accumulated.

  ``max_detections=None`` keeps ``pycocotools``' defaults (caps 1, 10, 100);
  ``verbose`` lets it print its progress and summary table.
  """
  if max_detections is not None:
    _check_max_detections(max_detections)
  annotations = [
    {**det, 'id': i, 'area': det['bbox'][2] * det['bbox'][3], 'iscrowd': 0}
    for i, det in enumerate(detections, start=1)
  ]
  results = _coco({**ground_truth, 'annotations': annotations})
  output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  with output:
    coco_eval = COCOeval(_coco(ground_truth), results, iouType='bbox')
    if max_detections is not None:
      coco_eval.params.maxDets = [1, 10, max_detections]
    coco_eval.evaluate()
    coco_eval.accumulate()
    if verbose:
      coco_eval.summarize()
  return coco_eval


def compute_by_class(
  evaluator: DetectionEvaluator,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
  """``evaluator.compute()`` and the per-class rows (:func:`class_metrics`) of the same scoring.

  Returns:
    ``(metrics, classes)``: the first equals :meth:`DetectionEvaluator.compute`
    (all NaN but the counts when nothing has ground truth); ``classes`` maps
    each class with ground truth to floats keyed by :data:`CLASS_METRIC_NAMES`
    (empty when none has).
  """
  ground_truth, detections = evaluator.coco_json()
  counts = {
    'num_images': float(len(ground_truth['images'])),
    'num_targets': float(len(ground_truth['annotations'])),
    'num_detections': float(len(detections)),
  }
  if not ground_truth['annotations']:
    return {name: counts.get(name, float('nan')) for name in METRIC_NAMES}, {}
  coco_eval = _evaluated(
    ground_truth, detections, max_detections=evaluator.max_detections, verbose=evaluator.verbose
  )
  metrics = {**_summary(coco_eval), **best_f1(coco_eval)}
  classes = class_metrics(coco_eval, threshold=metrics['f1_threshold'])
  return {**metrics, **counts}, classes


def coco_summary(
  ground_truth: dict[str, Any], detections: list[dict[str, Any]]
) -> tuple[np.ndarray, str]:
  """``pycocotools``' standard evaluation (default parameters: at most 100 detections per image).

  Args:
    ground_truth: a COCO dataset dict (``images``, ``annotations``, ``categories``).
    detections: COCO result dicts (``image_id``, ``category_id``, ``bbox``
      ``[x, y, w, h]``, ``score``); may be empty (``COCO.loadRes`` may not).

  Returns:
    ``(stats, text)``: ``COCOeval.stats`` (``[12]``: mAP@0.5:0.95, mAP@0.5, ...)
    and the twelve lines ``COCOeval.summarize`` prints.
  """
  coco_eval = _evaluated(ground_truth, detections, max_detections=None)
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    coco_eval.summarize()
  return np.asarray(coco_eval.stats), text.getvalue().rstrip('\n')
