"""Upstream's detection on one image: letterbox, network, selection, back to the image's pixels.

Glossary: ``S`` the input side (``--img-size``), ``H``/``W`` an image's own
height and width, ``h``/``w`` its network input's (multiples of the model's
largest stride, at most ``S``), ``B`` images in a batch, ``C`` classes,
``R`` predicted boxes per image, ``Q`` candidates entering non-maximum
suppression, ``D`` detections kept per image, ``n`` those found in one image
(``n <= D``).

Each image is letterboxed as upstream's detection does (:func:`letterbox`):
resized so that its longer side is ``S``, then padded only up to the next
multiple of the stride, so a non-square image gives a non-square input
``h x w``. The network compiles once per input shape (a folder of mixed
aspect ratios compiles a few shapes, at most ``2 S / stride - 1``; the
compiled programs are kept for the run and in jax's persistent cache).
:func:`decode` runs the network, :func:`select` picks the detections with
:func:`reorg_jax.models.inference.select_detections` (upstream's
``non_max_suppression``: per box its best class, objectness and score above
the threshold, suppression within a class) and :func:`to_original_pixels`
maps them to the image's pixels as upstream's ``scale_coords`` does.

:func:`select` gives upstream's detections although only ``Q`` boxes enter
suppression: greedy suppression decides each box by the higher-scoring boxes
alone, so suppressing the ``Q`` best candidates keeps exactly the boxes that
suppressing all of them keeps among those ``Q``. Only an image with more
candidates than ``Q`` and fewer than ``D`` detections kept may lack some;
it is selected again with ``Q`` enlarged to cover every candidate, up to
``max_candidates`` (upstream's bound is 30000).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.data import augment
from reorg_jax.models import inference, yolo

__all__ = [
  'FIRST_CANDIDATES',
  'Selection',
  'decode',
  'input_shape',
  'letterbox',
  'select',
  'to_original_pixels',
]

# Candidates entering suppression at first (more only where an image needs them).
FIRST_CANDIDATES = 1024


def _resized(original_hw: tuple[int, int], *, size: int) -> tuple[int, int]:
  """``(width, height)`` of an ``H x W`` image resized to fit ``S x S``, its longer side ``S``."""
  h0, w0 = original_hw
  ratio = min(size / h0, size / w0)
  return max(1, round(w0 * ratio)), max(1, round(h0 * ratio))


def input_shape(original_hw: tuple[int, int], *, size: int, stride: int) -> tuple[int, int]:
  """``(h, w)``: the network input :func:`letterbox` makes of an ``H x W`` image."""
  width, height = _resized(original_hw, size=size)
  return height + (size - height) % stride, width + (size - width) % stride


def letterbox(image: np.ndarray, *, size: int, stride: int) -> np.ndarray:
  """``[H, W, 3]`` uint8 -> the ``[h, w, 3]`` network input (upstream's detection letterbox).

  Resized (bilinear) so that it fits ``S x S`` with its longer side ``S``,
  then padded with grey (:data:`reorg_jax.data.augment.PAD_VALUE`) on both
  sides of each axis (any odd pixel on the right and bottom) up to the next
  multiple of ``stride``.
  """
  h0, w0 = image.shape[:2]
  width, height = _resized((h0, w0), size=size)
  if (width, height) != (w0, h0):
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
  out_h, out_w = input_shape((h0, w0), size=size, stride=stride)
  top, left = (out_h - height) // 2, (out_w - width) // 2
  canvas = np.full((out_h, out_w, image.shape[2]), augment.PAD_VALUE, np.uint8)
  canvas[top : top + height, left : left + width] = image
  return canvas


def to_original_pixels(
  boxes: np.ndarray, *, input_hw: tuple[int, int], original_hw: tuple[int, int]
) -> np.ndarray:
  """``[n, 4]`` corners in the ``h x w`` input to the ``H x W`` image's pixels, clipped to it.

  As upstream's ``scale_coords`` without the letterbox's own ratio and
  padding: one scale, the smaller of ``h / H`` and ``w / W``, and the padding
  that scale leaves, split evenly. This can differ from the exact inverse of
  :func:`letterbox` (whose resized side is rounded to whole pixels and whose
  padding is split in whole pixels) by up to 3/4 of an input pixel.
  """
  (h_in, w_in), (h0, w0) = input_hw, original_hw
  gain = min(h_in / h0, w_in / w0)
  pad = np.array([(w_in - w0 * gain) / 2, (h_in - h0 * gain) / 2] * 2)
  moved = (np.asarray(boxes, np.float64).reshape(-1, 4) - pad) / gain
  return box_lib.clip_xyxy(moved, width=w0, height=h0, xp=np)


@functools.partial(jax.jit, static_argnames='model')
def decode(model: yolo.YOLO, variables: dict[str, Any], images: jax.Array) -> jax.Array:
  """``[B, h, w, 3]`` uint8 inputs -> the decoded ``[B, R, 5 + C]`` (compiled once per shape)."""
  return model.apply(variables, yolo.unit_images(images), train=False)


class Selection(NamedTuple):
  """One image's detections, best first.

  Attributes:
    boxes: ``[n, 4]`` corners ``x1, y1, x2, y2`` in input pixels.
    scores: ``[n]`` objectness times class probability.
    classes: ``[n]`` class indices.
    candidates: boxes of the allowed classes above the threshold (upstream's
      boxes entering suppression).
    complete: the detections are all those of suppression over every
      candidate (false only past ``max_candidates``).
  """

  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  candidates: int
  complete: bool


@functools.partial(jax.jit, static_argnames=('max_detections', 'max_candidates', 'class_agnostic'))
def _select(
  decoded: jax.Array,
  allowed: jax.Array,
  score_threshold: jax.Array,
  iou_threshold: jax.Array,
  *,
  max_detections: int,
  max_candidates: int,
  class_agnostic: bool,
) -> inference.Detections:
  """:func:`select_detections` on the boxes whose best class is ``allowed`` (``[C]`` bool)."""
  best = jnp.argmax(decoded[..., 5:] * decoded[..., 4:5], axis=-1)  # [B, R]
  objectness = jnp.where(allowed[best], decoded[..., 4], 0.0)  # 0 never passes a threshold >= 0
  return inference.select_detections(
    decoded.at[..., 4].set(objectness),
    max_detections=max_detections,
    max_candidates=max_candidates,
    score_threshold=score_threshold,
    iou_threshold=iou_threshold,
    class_agnostic=class_agnostic,
  )


def select(
  decoded: jax.Array | np.ndarray,
  *,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
  classes: Sequence[int] | None,
  class_agnostic: bool,
  first_candidates: int = FIRST_CANDIDATES,
) -> list[Selection]:
  """Upstream's ``non_max_suppression`` on decoded outputs, one :class:`Selection` per image.

  Args:
    decoded: ``[B, R, 5 + C]`` from :func:`decode`.
    score_threshold: minimum objectness and score (``conf_thres``).
    iou_threshold: suppression IoU (``iou_thres``).
    max_detections: ``D`` (upstream's ``max_det``; capped at ``R``).
    max_candidates: the most candidates suppression takes (upstream's ``max_nms``).
    classes: keep only boxes whose best class is one of these; ``None``: all.
    class_agnostic: suppress across classes.
    first_candidates: ``Q`` of the first try; an image that needs more is
      selected again with ``Q`` covering its candidates (see the module docstring).
  """
  decoded = jnp.asarray(decoded)
  rows, num_classes = decoded.shape[1], decoded.shape[2] - 5
  allowed = np.ones(num_classes, bool)
  if classes is not None:
    allowed[:] = False
    allowed[list(classes)] = True
  keep = min(max_detections, rows)
  bound = min(rows, max(max_candidates, keep))
  thresholds = (jnp.float32(score_threshold), jnp.float32(iou_threshold))

  def attempt(candidates: int) -> inference.Detections:
    found = _select(
      decoded,
      jnp.asarray(allowed),
      *thresholds,
      max_detections=keep,
      max_candidates=candidates,
      class_agnostic=class_agnostic,
    )
    return jax.device_get(found)

  width = min(bound, max(keep, first_candidates))
  found = attempt(width)
  short = (found.num_candidates > width) & (found.valid.sum(axis=1) < keep)  # [B]
  if short.any() and width < bound:
    needed = int(found.num_candidates[short].max())
    width = min(bound, 1 << (needed - 1).bit_length())
    found = attempt(width)
    short = (found.num_candidates > width) & (found.valid.sum(axis=1) < keep)
  out = []
  for b, valid in enumerate(found.valid):
    out.append(
      Selection(
        boxes=np.asarray(found.boxes[b][valid], np.float64),
        scores=np.asarray(found.scores[b][valid], np.float64),
        classes=np.asarray(found.classes[b][valid], np.int64),
        candidates=int(found.num_candidates[b]),
        complete=not bool(short[b]),
      )
    )
  return out
