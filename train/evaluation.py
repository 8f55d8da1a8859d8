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

from reorg_jax import evaluate
from reorg_jax.data import loader, prefetch
from reorg_jax.models import yolo
from reorg_jax.models.inference import Detections, predict
from reorg_jax.training import step as train_lib
from train import report
from train.pieces import Reports, Run

__all__ = ['METRIC_LABELS', 'best_epoch', 'detector', 'end_epoch', 'evaluate_split']

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
  ecfg, metric_name = pieces.config['eval'], pieces.config['checkpoint']['best_metric']
  started = time.perf_counter()
  detect = detector(
    pieces.model,
    state.variables(use_ema=True),
    batch_sharding=pieces.batch_sharding,
    score_threshold=ecfg['score_threshold'],
    iou_threshold=ecfg['iou_threshold'],
    max_detections=ecfg['max_detections'],
    max_candidates=ecfg['max_candidates'],
  )
  metrics = evaluate_split(
    detect,
    pieces.val_feed,
    num_classes=pieces.num_classes,
    max_detections=ecfg['max_detections'],
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
