"""Inference: decoded head outputs to a fixed number of detections per image.

Glossary: ``B`` batch, ``R`` decoded rows (boxes) per image, ``C`` classes,
``F = 5 + C`` features of a row, ``Q`` candidates entering non-maximum
suppression (``max_candidates``), ``D`` detections kept (``max_detections``).

Selection follows the original's ``non_max_suppression`` (single label per
box): a box is a candidate when its objectness and its best class score
(objectness times class probability; objectness alone when ``C == 1``) both
exceed ``score_threshold``; candidates are suppressed greedily in score order
by a higher-scoring kept box of the same class (any class when
``class_agnostic``) with IoU above ``iou_threshold``.

Shapes are static so the whole step compiles once: only the ``Q``
best-scoring candidates enter suppression (the original allows 30000) and at
most ``D`` detections come out, padded. ``num_candidates`` reports how many
boxes passed the thresholds, so a caller can tell when ``Q`` was too small.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from reorg_jax.boxes import cxcywh_to_xyxy, iou_xyxy
from reorg_jax.models.yolo import YOLO

__all__ = ['Detections', 'predict', 'select_detections']


class Detections(NamedTuple):
  """Per image, the kept detections in decreasing score order, padded to ``D``.

  Attributes:
    boxes: ``[B, D, 4]`` corners ``x1, y1, x2, y2`` in input pixels; zeros where padded.
    scores: ``[B, D]`` objectness times class probability; zeros where padded.
    classes: ``[B, D]`` int32 class indices; ``-1`` where padded.
    valid: ``[B, D]`` bool, true for real detections (a prefix of each row).
    num_candidates: ``[B]`` int32, boxes that passed the thresholds (before
      the ``Q`` cut and suppression).
  """

  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array
  num_candidates: jax.Array


def _select_one(
  decoded: jax.Array,
  *,
  max_detections: int,
  max_candidates: int,
  score_threshold: jax.Array,
  iou_threshold: jax.Array,
  class_agnostic: bool,
) -> Detections:
  """One image: ``[R, F]`` -> detections with ``[D, ...]`` fields."""
  objectness = decoded[:, 4]  # [R]
  if decoded.shape[1] == 6:  # one class: the original scores by objectness alone
    class_scores = objectness[:, None]  # [R, 1]
  else:
    class_scores = decoded[:, 5:] * objectness[:, None]  # [R, C]
  scores = class_scores.max(axis=-1)  # [R]
  classes = class_scores.argmax(axis=-1).astype(jnp.int32)  # [R]
  passed = (objectness > score_threshold) & (scores > score_threshold)  # [R]
  ranked, index = jax.lax.top_k(jnp.where(passed, scores, -jnp.inf), max_candidates)  # [Q]
  alive = jnp.isfinite(ranked)  # [Q]
  boxes = cxcywh_to_xyxy(decoded[index, :4])  # [Q, 4]
  classes = classes[index]  # [Q]

  overlap = jnp.nan_to_num(iou_xyxy(boxes, boxes)) > iou_threshold  # [Q, Q]
  if not class_agnostic:
    overlap &= classes[:, None] == classes[None, :]
  later = jnp.arange(max_candidates)[None, :] > jnp.arange(max_candidates)[:, None]  # [Q, Q]
  overlap &= later

  def suppress(row, keep):
    return keep & ~(keep[row] & overlap[row])

  keep = jax.lax.fori_loop(0, max_candidates, suppress, alive)  # [Q]
  kept_scores, order = jax.lax.top_k(jnp.where(keep, ranked, -jnp.inf), max_detections)  # [D]
  valid = jnp.isfinite(kept_scores)  # [D]
  return Detections(
    boxes=jnp.where(valid[:, None], boxes[order], 0.0),
    scores=jnp.where(valid, kept_scores, 0.0),
    classes=jnp.where(valid, classes[order], -1),
    valid=valid,
    num_candidates=passed.sum(dtype=jnp.int32),
  )


def select_detections(
  decoded: jax.Array,
  *,
  max_detections: int,
  max_candidates: int,
  score_threshold: float | jax.Array,
  iou_threshold: float | jax.Array,
  class_agnostic: bool,
) -> Detections:
  """Thresholds and non-maximum suppression on decoded outputs.

  Args:
    decoded: ``[B, R, F]`` from the model in evaluation mode: box centre and
      size in pixels, objectness, class probabilities.
    max_detections: ``D``, detections per image (static).
    max_candidates: ``Q``, candidates entering suppression (static, ``D <= Q <= R``).
    score_threshold: minimum objectness and score.
    iou_threshold: IoU above which a lower-scoring box is suppressed.
    class_agnostic: suppress across classes.

  Returns:
    :class:`Detections`.
  """
  if decoded.ndim != 3 or decoded.shape[-1] < 6:
    raise ValueError(f'expected decoded outputs [B, N, 5 + C], got shape {decoded.shape}')
  if not 1 <= max_detections <= max_candidates <= decoded.shape[1]:
    raise ValueError(
      f'need 1 <= max_detections ({max_detections}) <= max_candidates ({max_candidates}) '
      f'<= boxes per image ({decoded.shape[1]})'
    )
  select = functools.partial(
    _select_one,
    max_detections=max_detections,
    max_candidates=max_candidates,
    score_threshold=jnp.asarray(score_threshold, decoded.dtype),
    iou_threshold=jnp.asarray(iou_threshold, decoded.dtype),
    class_agnostic=class_agnostic,
  )
  return jax.vmap(select)(decoded)


@functools.partial(
  jax.jit, static_argnames=('model', 'max_detections', 'max_candidates', 'class_agnostic')
)
def predict(
  model: YOLO,
  variables: Mapping[str, Any],
  images: jax.Array,
  *,
  max_detections: int = 300,
  max_candidates: int = 1024,
  score_threshold: float | jax.Array = 0.25,
  iou_threshold: float | jax.Array = 0.45,
  class_agnostic: bool = False,
) -> Detections:
  """Runs ``model`` in evaluation mode and selects detections; compiled once per shape.

  Args:
    model: the model (static: a new model compiles anew).
    variables: its ``params`` and ``batch_stats``.
    images: ``[B, H, W, 3]`` float images scaled to ``[0, 1]``, ``H``/``W``
      multiples of ``model.max_stride``. Integer images (``uint8`` 0..255)
      are an error: convert them first (:func:`reorg_jax.models.yolo.unit_images`).
    max_detections: ``D`` (the original's ``max_det``).
    max_candidates: ``Q``, capped at ``R``, the boxes per image.
    score_threshold: minimum objectness and score (the original's ``conf_thres``;
      its detection script uses 0.25, its evaluation 0.001).
    iou_threshold: suppression IoU (``iou_thres``; 0.45 for detection, 0.65 for evaluation).
    class_agnostic: suppress across classes.

  Returns:
    :class:`Detections` with ``D`` rows per image.

  Raises:
    ValueError: integer images, or a shape the model does not take.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f'predict needs float images scaled to [0, 1], got dtype {images.dtype}; '
      'convert uint8 images with reorg_jax.models.yolo.unit_images'
    )
  decoded = model.apply(variables, images, train=False)  # [B, R, F]
  return select_detections(
    decoded,
    max_detections=max_detections,
    max_candidates=min(max_candidates, decoded.shape[1]),
    score_threshold=score_threshold,
    iou_threshold=iou_threshold,
    class_agnostic=class_agnostic,
  )
