"""Geometric augmentation: upstream's random affine/perspective warp of an image and its boxes.

Glossary: ``N`` label rows (boxes) of an image, ``H``/``W`` image height/width
in pixels, ``S`` output side of a square training image, ``P`` points of a
polygon.

Labels are ``[N, 5]`` float32 pixel rows ``(class, x1, y1, x2, y2)`` and
segments ``N`` ``[P_i, 2]`` pixel polygons, as in :mod:`reorg_jax.data.augment`.
A warp re-boxes every object: by the bounding box of its four transformed
corners, or, given segments, of its transformed (resampled) polygon, which
follows rotated and perspective-warped objects tightly.

Boxes are only ever removed by :func:`box_candidates` after a warp
(:func:`warp`), exactly where upstream removes them: boxes that end up smaller
than 2 pixels a side, with less than 10 % (1 % when warped as segments) of their
scaled area left inside the image, or with an aspect ratio of 20 or more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.data.augment import PAD_VALUE, empty_labels

__all__ = [
  'MAX_ASPECT',
  'MIN_AREA_RATIO',
  'MIN_SIDE',
  'RESAMPLE_POINTS',
  'SEGMENT_MIN_AREA_RATIO',
  'affine_matrix',
  'box_candidates',
  'box_segments',
  'random_affine',
  'resample_segments',
  'segment_boxes',
  'warp',
]

# Upstream's box_candidates thresholds: minimum side (pixels), maximum aspect ratio,
# minimum fraction of the (scaled) original area still visible.
MIN_SIDE = 2.0
MAX_ASPECT = 20.0
MIN_AREA_RATIO = 0.1
# Upstream's visible-area threshold when boxes come from warped segments.
SEGMENT_MIN_AREA_RATIO = 0.01
# Upstream resamples every segment to this many points before warping it.
RESAMPLE_POINTS = 1000


def box_candidates(
  before: np.ndarray,
  after: np.ndarray,
  *,
  area_scale: float = 1.0,
  min_side: float = MIN_SIDE,
  max_aspect: float = MAX_ASPECT,
  min_area_ratio: float = MIN_AREA_RATIO,
) -> np.ndarray:
  """Which warped boxes to keep (upstream's rule).

  Args:
    before: ``[N, 4]`` pixel ``(x1, y1, x2, y2)`` boxes before the warp.
    after: ``[N, 4]`` the same boxes after the warp and clipping.
    area_scale: how much the warp scales areas (``zoom ** 2``); the visible
      fraction is ``area(after) / (area(before) * area_scale)``.
    min_side: both sides of ``after`` must exceed this many pixels.
    max_aspect: the longer over the shorter side of ``after`` must stay below this.
    min_area_ratio: the visible fraction must exceed this.

  Returns:
    ``[N]`` bool.
  """
  eps = 1e-16
  w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
  w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
  aspect = np.maximum(w1 / (h1 + eps), h1 / (w1 + eps))
  visible = w1 * h1 / (w0 * h0 * area_scale + eps)
  return (w1 > min_side) & (h1 > min_side) & (visible > min_area_ratio) & (aspect < max_aspect)


def affine_matrix(
  *,
  rng: np.random.Generator,
  in_size: tuple[int, int],
  out_size: tuple[int, int],
  degrees: float,
  translate: float,
  scale: float,
  shear: float,
  perspective: float,
) -> tuple[np.ndarray, float]:
  """Draws upstream's random warp: about the input centre, then to a jittered output centre.

  Args:
    rng: source of the random draws.
    in_size: input ``(height, width)``.
    out_size: output ``(height, width)``.
    degrees, translate, scale, shear, perspective: ranges as in
      :class:`reorg_jax.data.augment.AugmentConfig`.

  Returns:
    ``(matrix, zoom)``: the ``[3, 3]`` homogeneous pixel transform and the
    drawn zoom factor.
  """
  in_h, in_w = in_size
  out_h, out_w = out_size
  to_origin = np.array([[1, 0, -in_w / 2], [0, 1, -in_h / 2], [0, 0, 1]], np.float64)
  persp = np.eye(3)
  persp[2, :2] = rng.uniform(-perspective, perspective, 2)
  angle = math.radians(rng.uniform(-degrees, degrees))
  zoom = rng.uniform(1 - scale, 1.1 + scale)
  cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
  # Counter-clockwise on screen (y points down), as OpenCV's rotation matrices.
  rotate = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]], np.float64)
  shear_xy = np.eye(3)
  shear_xy[0, 1], shear_xy[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear, 2)))
  move = np.eye(3)
  move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
  move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
  return move @ shear_xy @ rotate @ persp @ to_origin, zoom


def resample_segments(
  segments: Sequence[np.ndarray], *, points: int = RESAMPLE_POINTS
) -> list[np.ndarray]:
  """Each closed polygon as ``points`` points evenly spaced in vertex index (upstream's rule).

  The outline is closed by repeating the first vertex and interpolated
  linearly at ``points`` equally spaced positions from the first vertex to
  that repeat, so every edge gets the same number of points whatever its length.

  Args:
    segments: ``[P_i, 2]`` polygons.
    points: points per resampled polygon.

  Returns:
    ``[points, 2]`` float64 arrays, one per polygon.
  """
  out = []
  for segment in segments:
    closed = np.concatenate([segment, segment[:1]], axis=0).astype(np.float64)
    where = np.linspace(0, len(closed) - 1, points)
    vertex = np.arange(len(closed))
    out.append(np.stack([np.interp(where, vertex, closed[:, k]) for k in range(2)], axis=1))
  return out


def segment_boxes(points: np.ndarray, *, width: float, height: float) -> np.ndarray:
  """Boxes of polygons from their points inside the image.

  Args:
    points: ``[N, P, 2]`` pixel points (e.g. resampled, warped outlines).
    width, height: the image; points outside ``[0, width] x [0, height]`` are ignored.

  Returns:
    ``[N, 4]`` float64 ``(x1, y1, x2, y2)``; all zeros for a polygon with no
    point inside (which :func:`box_candidates` then removes).
  """
  inside = ((points >= 0) & (points <= np.asarray([width, height]))).all(axis=-1)  # [N, P]
  x, y = points[..., 0], points[..., 1]
  boxes = np.stack(
    [
      np.where(inside, x, np.inf).min(axis=-1),
      np.where(inside, y, np.inf).min(axis=-1),
      np.where(inside, x, -np.inf).max(axis=-1),
      np.where(inside, y, -np.inf).max(axis=-1),
    ],
    axis=-1,
  ).reshape(-1, 4)
  boxes[~inside.reshape(len(boxes), -1).any(axis=-1)] = 0
  return boxes


def box_segments(boxes: np.ndarray) -> list[np.ndarray]:
  """``[N, 4]`` ``(x1, y1, x2, y2)`` boxes as ``N`` float32 ``[4, 2]`` rectangles (for rows
  without a polygon), corners as :func:`reorg_jax.boxes.xyxy_to_polygon` orders them."""
  return list(box_lib.xyxy_to_polygon(np.asarray(boxes, np.float32).reshape(-1, 4), xp=np))


def warp(
  image: np.ndarray,
  labels: np.ndarray,
  *,
  matrix: np.ndarray,
  out_size: tuple[int, int],
  area_scale: float,
  segments: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Warps an image and its boxes with a pixel transform, dropping degenerate boxes.

  Without ``segments`` each box becomes the bounding box of its four
  transformed corners, clipped to the output. With them (upstream's
  segment-aware warp), each object's polygon is resampled
  (:func:`resample_segments`), transformed, and its box is that of the
  transformed points inside the output (:func:`segment_boxes`), which follows
  rotated and perspective-warped objects tightly. Then :func:`box_candidates`
  removes boxes that became too small, mostly invisible (under 10 % of the
  scaled area left, 1 % with segments, as upstream) or too thin.

  Args:
    image: ``[H, W, 3]`` uint8.
    labels: ``[N, 5]`` pixel labels of ``image``.
    matrix: ``[3, 3]`` transform from input to output pixels (affine when its
      last row is ``(0, 0, 1)``).
    out_size: output ``(height, width)``.
    area_scale: area factor of the warp, passed to :func:`box_candidates`.
    segments: ``N`` ``[P_i, 2]`` pixel polygons of ``image``, one per label row,
      or ``None``.

  Returns:
    ``([height, width, 3] image, [N', 5] labels)`` with ``N' <= N``.

  Raises:
    ValueError: ``segments`` given, but not one per label row.
  """
  out_h, out_w = out_size
  fill = (PAD_VALUE,) * 3
  projective = not np.allclose(matrix[2], (0, 0, 1))
  if projective:
    image = cv2.warpPerspective(image, matrix, dsize=(out_w, out_h), borderValue=fill)
  elif image.shape[:2] != (out_h, out_w) or not np.allclose(matrix, np.eye(3)):
    image = cv2.warpAffine(image, matrix[:2], dsize=(out_w, out_h), borderValue=fill)
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  if segments is not None and len(segments) != len(labels):
    raise ValueError(f'warp needs one segment per label row, got {len(segments)} for {len(labels)}')
  if not len(labels):
    return image, empty_labels()

  def transform(points: np.ndarray) -> np.ndarray:  # [N, P, 2] -> [N, P, 2]
    points = np.concatenate([points, np.ones(points.shape[:2] + (1,))], axis=-1) @ matrix.T
    return points[..., :2] / points[..., 2:] if projective else points[..., :2]

  if segments is not None:
    xy = transform(np.stack(resample_segments(segments), axis=0))
    boxes = segment_boxes(xy, width=out_w, height=out_h)
    min_area_ratio = SEGMENT_MIN_AREA_RATIO
  else:
    x1, y1, x2, y2 = labels[:, 1:].T.astype(np.float64)
    corners = np.stack(
      [
        np.stack([x1, y1], -1),
        np.stack([x2, y1], -1),
        np.stack([x1, y2], -1),
        np.stack([x2, y2], -1),
      ],
      axis=1,
    )  # [N, 4 corners, 2]
    xy = transform(corners)
    boxes = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)
    boxes = box_lib.clip_xyxy(boxes, width=out_w, height=out_h, xp=np)
    min_area_ratio = MIN_AREA_RATIO
  keep = box_candidates(labels[:, 1:], boxes, area_scale=area_scale, min_area_ratio=min_area_ratio)
  out = np.concatenate([labels[keep, :1], boxes[keep]], axis=1).astype(np.float32)
  return image, out


def random_affine(
  image: np.ndarray,
  labels: np.ndarray,
  *,
  rng: np.random.Generator,
  out_size: tuple[int, int],
  degrees: float,
  translate: float,
  scale: float,
  shear: float,
  perspective: float,
  segments: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`affine_matrix` then :func:`warp`; ranges as in ``AugmentConfig``.

  Args:
    image: ``[H, W, 3]`` uint8, e.g. a ``[2S, 2S]`` mosaic canvas.
    labels: ``[N, 5]`` pixel labels of ``image``.
    rng: source of the random draws.
    out_size: output ``(height, width)``, e.g. ``(S, S)``.
    degrees, translate, scale, shear, perspective: as for :func:`affine_matrix`.
    segments: as for :func:`warp`.

  Returns:
    ``([height, width, 3] image, [N', 5] labels)``.
  """
  matrix, zoom = affine_matrix(
    rng=rng,
    in_size=image.shape[:2],
    out_size=out_size,
    degrees=degrees,
    translate=translate,
    scale=scale,
    shear=shear,
    perspective=perspective,
  )
  return warp(
    image, labels, matrix=matrix, out_size=out_size, area_scale=zoom**2, segments=segments
  )
