"""Box formats, pairwise IoU and element-wise CIoU.

Glossary: ``N``/``M`` box counts, ``...`` leading batch dimensions. A box's
format is part of every name: ``cxcywh`` (centre x, centre y, width, height)
or ``xyxy`` (left, top, right, bottom). Coordinates can be pixels, grid cells
or normalised; the functions do not care as long as both operands agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The epsilon upstream's ``bbox_iou`` uses in the CIoU branch.
CIOU_EPS = 1e-7


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """``[..., 4]`` centre/size boxes to ``[..., 4]`` corner boxes."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """``[..., 4]`` corner boxes to ``[..., 4]`` centre/size boxes."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_area_xyxy(boxes: jax.Array) -> jax.Array:
  """``[..., 4]`` corner boxes to ``[...]`` areas (negative if the box is inverted)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def iou_xyxy(boxes1: jax.Array, boxes2: jax.Array, *, all_pairs: bool = True) -> jax.Array:
  """Intersection over union of corner boxes, without epsilon.

  The formula is ``inter / (area1 + area2 - inter)``, as upstream's
  ``box_iou`` computes it for the assignment cost. Two empty boxes give NaN;
  callers mask such pairs.

  Args:
    boxes1: ``[..., N, 4]``.
    boxes2: ``[..., M, 4]`` if ``all_pairs`` else ``[..., N, 4]``.
    all_pairs: every pair (``[..., N, M]``) or element-wise (``[..., N]``).

  Returns:
    ``[..., N, M]`` or ``[..., N]`` IoU.
  """
  if all_pairs:
    boxes1 = boxes1[..., :, None, :]  # [..., N, 1, 4]
    boxes2 = boxes2[..., None, :, :]  # [..., 1, M, 4]
  x1, y1, x2, y2 = jnp.moveaxis(boxes1, -1, 0)
  u1, v1, u2, v2 = jnp.moveaxis(boxes2, -1, 0)
  inter_w = jnp.clip(jnp.minimum(x2, u2) - jnp.maximum(x1, u1), 0)
  inter_h = jnp.clip(jnp.minimum(y2, v2) - jnp.maximum(y1, v1), 0)
  inter = inter_w * inter_h
  return inter / (box_area_xyxy(boxes1) + box_area_xyxy(boxes2) - inter)


def ciou_cxcywh(pred: jax.Array, target: jax.Array, *, eps: float = CIOU_EPS) -> jax.Array:
  """Element-wise Complete IoU of centre/size boxes, as upstream's training loss uses it.

  Follows upstream's ``bbox_iou(..., CIoU=True)`` term by term: ``eps`` is
  added to both heights, to the union, to the enclosing diagonal and inside the
  aspect-ratio arctangents, and the trade-off weight ``alpha`` carries no
  gradient.

  Args:
    pred: ``[..., 4]`` predicted boxes.
    target: ``[..., 4]`` target boxes, same units as ``pred``.
    eps: numerical guard; upstream uses ``1e-7``.

  Returns:
    ``[...]`` CIoU, in ``(-1.5, 1]``.
  """
  p = cxcywh_to_xyxy(pred)
  t = cxcywh_to_xyxy(target)
  inter_w = jnp.clip(jnp.minimum(p[..., 2], t[..., 2]) - jnp.maximum(p[..., 0], t[..., 0]), 0)
  inter_h = jnp.clip(jnp.minimum(p[..., 3], t[..., 3]) - jnp.maximum(p[..., 1], t[..., 1]), 0)
  inter = inter_w * inter_h
  w1, h1 = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1] + eps
  w2, h2 = t[..., 2] - t[..., 0], t[..., 3] - t[..., 1] + eps
  union = w1 * h1 + w2 * h2 - inter + eps
  iou = inter / union
  enclose_w = jnp.maximum(p[..., 2], t[..., 2]) - jnp.minimum(p[..., 0], t[..., 0])
  enclose_h = jnp.maximum(p[..., 3], t[..., 3]) - jnp.minimum(p[..., 1], t[..., 1])
  diagonal2 = enclose_w**2 + enclose_h**2 + eps
  centre_dist2 = (
    (t[..., 0] + t[..., 2] - p[..., 0] - p[..., 2]) ** 2
    + (t[..., 1] + t[..., 3] - p[..., 1] - p[..., 3]) ** 2
  ) / 4
  v = (4 / math.pi**2) * (jnp.arctan(w2 / (h2 + eps)) - jnp.arctan(w1 / (h1 + eps))) ** 2
  alpha = jax.lax.stop_gradient(v / (v - iou + (1 + eps)))
  return iou - (centre_dist2 / diagonal2 + v * alpha)
