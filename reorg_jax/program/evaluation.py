"""Validation of a run: the EMA weights' detections scored on the val split every epoch.

Glossary: ``B`` batch size (all devices), ``S`` image side, ``C`` classes,
``g`` the global step (batches trained so far).

:func:`detector` runs the model through
:func:`reorg_jax.models.inference.predict` with the images split over the
devices; :func:`evaluate_split` scores any such ``detect`` on every image of
a feed (COCO metrics, :mod:`reorg_jax.evaluate`). :func:`end_epoch` does both
with the run's ``eval`` options at the end of an epoch and records the
epoch: its ``results.csv`` row, scalars, plots, one line, and the best
checkpoint. :func:`best_epoch` reads the best epoch off the rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from reorg_jax import boxes as box_lib
from reorg_jax import evaluate
from reorg_jax.data import loader, prefetch
from reorg_jax.models import yolo
from reorg_jax.models.inference import Detections, predict, select_detections
from reorg_jax.program import report
from reorg_jax.program.pieces import Reports, Run
from reorg_jax.training import step as train_lib

__all__ = [
  'METRIC_LABELS',
  'best_epoch',
  'detector',
  'end_epoch',
  'evaluate_split',
  'letterbox_placement',
  'timed_detector',
  'to_original_pixels',
]

METRIC_LABELS = {'map50': 'mAP@0.5', 'map50_95': 'mAP@0.5:0.95'}


def evaluate_split(
  detect: Callable[[np.ndarray], Detections],
  feed: loader.BatchLoader,
  *,
  num_classes: int,
  max_detections: int,
) -> dict[str, float]:
  """COCO metrics (see :mod:`reorg_jax.evaluate`) of ``detect`` on every image of ``feed``.

  Args:
    detect: ``[B, S, S, 3]`` uint8 letterboxed images to host
      :class:`reorg_jax.models.inference.Detections` with ``max_detections`` rows
      per image, boxes in that frame (:func:`detector` for our model).
    feed: the validation batches.
    num_classes: ``C``.
    max_detections: detections kept per image.
  """
  scorer = evaluate.DetectionEvaluator(num_classes=num_classes, max_detections=max_detections)
  size = feed.image_size
  with prefetch.Prefetcher(feed.epoch(0), buffer_size=2) as batches:
    for batch in batches:
      detections = detect(batch.images)
      scorer.add_batch(
        boxes=detections.boxes,
        scores=detections.scores,
        classes=detections.classes,
        valid=detections.valid,
        targets=batch.targets,
        image_hw=(size, size),
        real=batch.real,
      )
  return scorer.compute()


def detector(
  model: yolo.YOLO,
  variables: dict[str, Any],
  *,
  batch_sharding: NamedSharding,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
) -> Callable[[np.ndarray], Detections]:
  """``detect`` for :func:`evaluate_split`: ``variables`` of ``model`` through :func:`predict`.

  Images are split along ``B`` over the devices; with several processes the
  detections are gathered from all of them.
  """

  def detect(images: np.ndarray) -> Detections:
    placed = train_lib.place(images, batch_sharding)
    detections = predict(
      model,
      variables,
      yolo.unit_images(placed),
      max_detections=max_detections,
      max_candidates=max_candidates,
      score_threshold=score_threshold,
      iou_threshold=iou_threshold,
    )
    if jax.process_count() > 1:
      return multihost_utils.process_allgather(detections, tiled=True)
    return jax.device_get(detections)

  return detect


def end_epoch(
  pieces: Run,
  state: train_lib.TrainState,
  reports: Reports,
  *,
  epoch: int,
  g: int,
  lr: float,
  seconds: float,
) -> None:
  """Validates the EMA weights, writes the epoch's row, plots and best checkpoint."""
  ecfg, metric_name = pieces.config.eval, pieces.config.checkpoint.best_metric
  started = time.perf_counter()
  detect = detector(
    pieces.model,
    state.variables(use_ema=True),
    batch_sharding=pieces.batch_sharding,
    score_threshold=ecfg.score_threshold,
    iou_threshold=ecfg.iou_threshold,
    max_detections=ecfg.max_detections,
    max_candidates=ecfg.max_candidates,
  )
  metrics = evaluate_split(
    detect,
    pieces.val_feed,
    num_classes=pieces.num_classes,
    max_detections=ecfg.max_detections,
  )
  eval_seconds = time.perf_counter() - started
  losses = _epoch_means(reports.steps.rows, epoch)
  row = {
    'epoch': epoch,
    'step': g,
    **losses,
    **{k: metrics[k] for k in ('precision', 'recall', 'map50', 'map50_95')},
    'lr': lr,
    'seconds': seconds,
  }
  reports.epochs.append(row)
  reports.scalars.add(
    {k: row[k] for k in ('precision', 'recall', 'map50', 'map50_95')}, step=g, prefix='val'
  )
  reports.scalars.add(losses, step=g, prefix='epoch')
  if reports.plots:
    report.plot_epochs(reports.epochs.rows, reports.workdir)
  reports.progress.write(
    f'epoch {epoch + 1}/{pieces.schedule.epochs}: loss {losses["loss"]:.4f} '
    f'(box {losses["box"]:.4f} obj {losses["obj"]:.4f} cls {losses["cls"]:.4f})  '
    f'P {row["precision"]:.3f} R {row["recall"]:.3f}  mAP@0.5 {row["map50"]:.4f}  '
    f'mAP@0.5:0.95 {row["map50_95"]:.4f}  [train {seconds:.0f}s, eval {eval_seconds:.0f}s]'
  )
  value = row[metric_name]
  if np.isfinite(value):
    reports.ckpt.save_best(g, state, metric=value, metadata={'epoch': epoch, metric_name: value})


def best_epoch(rows: list[dict[str, float]], metric: str) -> tuple[int, float] | None:
  """``(epoch, value)`` of the highest finite ``metric`` in ``rows`` (the earliest on ties)."""
  scored = [(r[metric], -r['epoch']) for r in rows if np.isfinite(r[metric])]
  if not scored:
    return None
  value, negative_epoch = max(scored)
  return int(-negative_epoch), float(value)


def _epoch_means(rows: list[dict[str, float]], epoch: int) -> dict[str, float]:
  chosen = [r for r in rows if r['epoch'] == epoch]
  return {k: float(np.mean([r[k] for r in chosen])) for k in report.LOSS_COLUMNS}


def timed_detector(
  model: yolo.YOLO,
  variables: dict[str, Any],
  *,
  batch_sharding: NamedSharding,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
) -> Callable[[np.ndarray], tuple[Detections, float, float]]:
  """:func:`detector` in two compiled steps, timed apart: the network, then the selection.

  The same computation as :func:`reorg_jax.models.inference.predict` (the
  network in evaluation mode, then
  :func:`reorg_jax.models.inference.select_detections`), compiled as two
  programs so that each can be timed (upstream's inference and NMS times).

  Returns:
    ``detect(images)``: ``[B, S, S, 3]`` uint8 letterboxed images to
    ``(detections, inference_seconds, nms_seconds)``, the detections on the
    host; each time runs from the call until the step's result is ready
    (the first call of a shape includes compiling it).
  """
  forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))

  @jax.jit
  def select(decoded: jax.Array, score: jax.Array, iou: jax.Array) -> Detections:
    return select_detections(
      decoded,
      max_detections=max_detections,
      max_candidates=min(max_candidates, decoded.shape[1]),
      score_threshold=score,
      iou_threshold=iou,
      class_agnostic=False,
    )

  def detect(images: np.ndarray) -> tuple[Detections, float, float]:
    placed = yolo.unit_images(train_lib.place(images, batch_sharding))
    started = time.perf_counter()
    decoded = jax.block_until_ready(forward(variables, placed))  # [B, R, 5 + C]
    inferred = time.perf_counter()
    detections = jax.block_until_ready(select(decoded, score_threshold, iou_threshold))
    selected = time.perf_counter()
    if jax.process_count() > 1:
      detections = multihost_utils.process_allgather(detections, tiled=True)
    return jax.device_get(detections), inferred - started, selected - inferred

  return detect


def letterbox_placement(original_hw: tuple[int, int], *, size: int) -> tuple[int, int, int, int]:
  """Where the validation loader puts an ``H x W`` image in its ``S x S`` input.

  The loader (:func:`reorg_jax.data.loader.load_sample` without augmentation)
  resizes the longer side to ``S`` (:func:`reorg_jax.data.augment.fit_long_side`),
  then letterboxes to a square (:func:`reorg_jax.data.augment.letterbox`);
  this repeats both steps' integer arithmetic.

  Returns:
    ``(width, height, left, top)``: the image's size in the input and the
    padding on its left and top; normalised label ``(x, y)`` lands at input
    pixel ``(x * width + left, y * height + top)``.
  """
  h0, w0 = (int(v) for v in original_hw)
  ratio = size / max(h0, w0)
  w1, h1 = (w0, h0) if ratio == 1 else (max(1, int(w0 * ratio)), max(1, int(h0 * ratio)))
  scale = min(size / h1, size / w1)
  width, height = round(w1 * scale), round(h1 * scale)
  return width, height, (size - width) // 2, (size - height) // 2


def to_original_pixels(boxes: np.ndarray, *, original_hw: tuple[int, int], size: int) -> np.ndarray:
  """``[D, 4]`` corners in the validation loader's ``S x S`` input to the original image's pixels.

  Undoes :func:`letterbox_placement` (exactly, for the labels' corners) and
  clips to the ``H x W`` image.
  """
  h0, w0 = (int(v) for v in original_hw)
  width, height, left, top = letterbox_placement((h0, w0), size=size)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  xs = (boxes[:, 0::2] - left) * (w0 / width)  # [D, 2]
  ys = (boxes[:, 1::2] - top) * (h0 / height)
  out = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # [D, 4]
  return box_lib.clip_xyxy(out, width=w0, height=h0, xp=np)
