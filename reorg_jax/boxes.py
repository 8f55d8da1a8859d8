"""Box formats, conversions, IoU and CIoU, for NumPy and ``jax.numpy`` alike.

Glossary: ``...`` leading dimensions (any number), ``I``/``J`` the box counts
of the two operands of a pairwise IoU, ``H``/``W`` image height/width in
pixels. Elsewhere in the package ``N`` counts label rows and ``M`` the boxes
of an image (padded).

A box's format is part of every name:

* ``cxcywh``: centre x, centre y, width, height;
* ``xyxy``: left, top, right, bottom (corners);
* ``xywh``: left, top, width, height (COCO's ``bbox``).

Coordinates are ``normalized`` (``[0, 1]`` spans the image's width in x and
its height in y) or ``pixel``; the plain conversions do not care which, as
long as operands agree. Every box is ``[..., 4]`` along the last axis.

Each function serves NumPy and JAX through its keyword ``xp``, the array
module to compute with: ``numpy`` on the host (data pipeline, evaluation) or
``jax.numpy`` (the default; traceable inside ``jit``). A function does the
same float operations in the same order with either module, so a host result
equals what the data code computed by hand before, bit for bit, in the input's
dtype (Python scalars such as a ``width`` do not promote it). The exception
is :func:`ciou_cxcywh`, the training loss's term: it holds its trade-off
weight out of the gradient and is ``jax.numpy`` only.
"""

from __future__ import annotations

import math
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  'CIOU_EPS',
  'IOA_EPS',
  'Array',
  'box_area_xyxy',
  'ciou_cxcywh',
  'clip_xyxy',
  'cxcywh_to_xywh',
  'cxcywh_to_xyxy',
  'ioa_xyxy',
  'iou_xyxy',
  'normalized_cxcywh_to_pixel_xywh',
  'normalized_cxcywh_to_pixel_xyxy',
  'pixel_xyxy_to_normalized_cxcywh',
  'scale_xyxy',
  'xywh_to_cxcywh',
  'xywh_to_xyxy',
  'xyxy_to_cxcywh',
  'xyxy_to_polygon',
  'xyxy_to_xywh',
]

Array = np.ndarray | jax.Array
"""A NumPy or JAX array; which one a function returns follows its ``xp``."""

# The epsilon upstream's ``bbox_iou`` uses in the CIoU branch.
CIOU_EPS = 1e-7
# The epsilon upstream's ``bbox_ioa`` adds to the covered box's area.
IOA_EPS = 1e-16


def cxcywh_to_xyxy(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` centre/size boxes to ``[..., 4]`` corner boxes."""
  cx, cy, w, h = xp.moveaxis(boxes, -1, 0)
  return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` corner boxes to ``[..., 4]`` centre/size boxes."""
  x1, y1, x2, y2 = xp.moveaxis(boxes, -1, 0)
  return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def xyxy_to_xywh(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` corner boxes to ``[..., 4]`` top-left/size boxes."""
  return xp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` top-left/size boxes to ``[..., 4]`` corner boxes."""
  return xp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def cxcywh_to_xywh(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` centre/size boxes to ``[..., 4]`` top-left/size boxes."""
  return xp.concatenate([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., 2:]], axis=-1)


def xywh_to_cxcywh(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` top-left/size boxes to ``[..., 4]`` centre/size boxes."""
  return xp.concatenate([boxes[..., :2] + boxes[..., 2:] / 2, boxes[..., 2:]], axis=-1)


def _scale_xy(boxes: Array, *, sx: float, sy: float, xp: ModuleType) -> Array:
  """Columns 0 and 2 times ``sx``, 1 and 3 times ``sy`` (any of the three formats)."""
  a, b, c, d = xp.moveaxis(boxes, -1, 0)
  return xp.stack([a * sx, b * sy, c * sx, d * sy], axis=-1)


def scale_xyxy(
  boxes: Array, *, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0, xp: ModuleType = jnp
) -> Array:
  """``[..., 4]`` corner boxes mapped by ``x -> x * sx + dx``, ``y -> y * sy + dy``."""
  x1, y1, x2, y2 = xp.moveaxis(boxes, -1, 0)
  return xp.stack([x1 * sx + dx, y1 * sy + dy, x2 * sx + dx, y2 * sy + dy], axis=-1)


def normalized_cxcywh_to_pixel_xyxy(
  boxes: Array,
  *,
  width: float,
  height: float,
  offset_x: float = 0.0,
  offset_y: float = 0.0,
  xp: ModuleType = jnp,
) -> Array:
  """``[..., 4]`` normalised centre/size boxes to pixel corners.

  ``width``/``height`` are the size of the image the boxes refer to, and
  ``offset_x``/``offset_y`` where its top-left corner lies in the output
  (e.g. a mosaic canvas): ``x1 = (cx - w / 2) * width + offset_x``.
  """
  return scale_xyxy(
    cxcywh_to_xyxy(boxes, xp=xp), sx=width, sy=height, dx=offset_x, dy=offset_y, xp=xp
  )


def pixel_xyxy_to_normalized_cxcywh(
  boxes: Array, *, width: float, height: float, xp: ModuleType = jnp
) -> Array:
  """``[..., 4]`` pixel corners of a ``width`` x ``height`` image to normalised centre/size.

  ``cx = (x1 + x2) / 2 / width``, ``w = (x2 - x1) / width``. Integer pixel
  corners give floats.
  """
  cx, cy, w, h = xp.moveaxis(xyxy_to_cxcywh(boxes, xp=xp), -1, 0)
  return xp.stack([cx / width, cy / height, w / width, h / height], axis=-1)


def normalized_cxcywh_to_pixel_xywh(
  boxes: Array, *, width: float, height: float, xp: ModuleType = jnp
) -> Array:
  """``[..., 4]`` normalised centre/size boxes to pixel top-left/size (as COCO's ``bbox``).

  Scales first, then converts: ``x = cx * width - w * width / 2``.
  """
  return cxcywh_to_xywh(_scale_xy(boxes, sx=width, sy=height, xp=xp), xp=xp)


def clip_xyxy(boxes: Array, *, width: float, height: float, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` corner boxes clipped to the frame ``[0, width] x [0, height]``."""
  x1, y1, x2, y2 = xp.moveaxis(boxes, -1, 0)
  return xp.stack(
    [xp.clip(x1, 0, width), xp.clip(y1, 0, height), xp.clip(x2, 0, width), xp.clip(y2, 0, height)],
    axis=-1,
  )


def xyxy_to_polygon(boxes: Array, *, xp: ModuleType = jnp) -> Array:
  """``[..., 4]`` corner boxes as ``[..., 4, 2]`` rectangles ``(x, y)``.

  The corners go top-left, top-right, bottom-right, bottom-left: clockwise
  on screen (y points down), a closed outline when read in order.
  """
  x1, y1, x2, y2 = xp.moveaxis(boxes, -1, 0)
  corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
  return xp.stack([xp.stack(corner, axis=-1) for corner in corners], axis=-2)


def box_area_xyxy(boxes: Array) -> Array:
  """``[..., 4]`` corner boxes to ``[...]`` areas (negative if the box is inverted).

  Indexing and arithmetic only, so it takes a NumPy or a JAX array as it is.
  """
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_xyxy(boxes1: Array, boxes2: Array, *, xp: ModuleType) -> Array:
  """``[...]`` overlap areas of broadcast ``[..., 4]`` corner boxes (0 when apart)."""
  x1, y1, x2, y2 = xp.moveaxis(boxes1, -1, 0)
  u1, v1, u2, v2 = xp.moveaxis(boxes2, -1, 0)
  inter_w = xp.clip(xp.minimum(x2, u2) - xp.maximum(x1, u1), 0, None)
  inter_h = xp.clip(xp.minimum(y2, v2) - xp.maximum(y1, v1), 0, None)
  return inter_w * inter_h


def iou_xyxy(
  boxes1: Array, boxes2: Array, *, all_pairs: bool = True, xp: ModuleType = jnp
) -> Array:
  """Intersection over union of corner boxes, without epsilon.

  The formula is ``inter / (area1 + area2 - inter)``, as upstream's
  ``box_iou`` computes it for the assignment cost. Two empty boxes give NaN;
  callers mask such pairs.

  Args:
    boxes1: ``[..., I, 4]``.
    boxes2: ``[..., J, 4]`` if ``all_pairs`` else ``[..., I, 4]``.
    all_pairs: every pair (``[..., I, J]``) or element-wise (``[..., I]``).
    xp: array module.

  Returns:
    ``[..., I, J]`` or ``[..., I]`` IoU.
  """
  if all_pairs:
    boxes1 = boxes1[..., :, None, :]  # [..., I, 1, 4]
    boxes2 = boxes2[..., None, :, :]  # [..., 1, J, 4]
  inter = _intersection_xyxy(boxes1, boxes2, xp=xp)
  return inter / (box_area_xyxy(boxes1) + box_area_xyxy(boxes2) - inter)


def ioa_xyxy(boxes1: Array, boxes2: Array, *, eps: float = IOA_EPS, xp: ModuleType = jnp) -> Array:
  """Intersection over the area of ``boxes2`` (upstream's ``bbox_ioa``), broadcast.

  E.g. one region ``[4]`` against ``[J, 4]`` boxes gives ``[J]``: how much of
  each box the region covers. ``eps`` is added to the areas (an empty box
  gives 0, not NaN).

  Args:
    boxes1: ``[..., 4]`` corner boxes.
    boxes2: ``[..., 4]`` corner boxes, broadcastable against ``boxes1``.
    eps: added to ``boxes2``'s areas.
    xp: array module.

  Returns:
    ``[...]`` the broadcast shape without the last axis.
  """
  return _intersection_xyxy(boxes1, boxes2, xp=xp) / (box_area_xyxy(boxes2) + eps)


def ciou_cxcywh(pred: jax.Array, target: jax.Array, *, eps: float = CIOU_EPS) -> jax.Array:
  """Element-wise Complete IoU of centre/size boxes, as upstream's training loss uses it.

  Follows upstream's ``bbox_iou(..., CIoU=True)`` term by term: ``eps`` is
  added to both heights, to the union, to the enclosing diagonal and inside the
  aspect-ratio arctangents, and the trade-off weight ``alpha`` carries no
  gradient. ``jax.numpy`` only (``alpha`` is held with ``jax.lax.stop_gradient``).

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
