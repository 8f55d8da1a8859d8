"""Image and box augmentations of YOLOv7's training recipe, on the host (NumPy/OpenCV).

Glossary: ``N`` boxes, ``H``/``W`` image height/width in pixels, ``S`` output
side of a square training image, ``P`` points of a polygon.

Every function is pure: it returns new arrays and draws randomness only from
the ``np.random.Generator`` it is given, so a seeded generator reproduces a
sample exactly. Images are ``[H, W, 3]`` uint8 RGB. Inside this module labels
are ``[N, 5]`` float32 rows ``(class, x1, y1, x2, y2)`` in pixels of the image
they travel with; :func:`normalized_to_pixels` and :func:`pixels_to_normalized`
convert from and to the label files' normalised ``(class, cx, cy, w, h)``.

Segments (polygon outlines of the objects, as COCO's segment labels) travel
beside the labels as a list of ``[P, 2]`` float arrays ``(x, y)``, one per label
row, in the same pixels (normalised ``[0, 1]`` where they come from a label
file). They only change how a warp re-boxes an object and what
:func:`cut_objects` cuts out; samples leave augmentation as boxes.

Boxes are only ever removed by :func:`box_candidates` after a geometric warp
(:func:`warp`), exactly where upstream removes them: boxes that end up smaller
than 2 pixels a side, with less than 10 % (1 % when warped as segments) of their
scaled area left inside the image, or with an aspect ratio of 20 or more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

# Grey of the padding and of empty canvas areas, as upstream.
PAD_VALUE = 114
# Upstream's box_candidates thresholds: minimum side (pixels), maximum aspect ratio,
# minimum fraction of the (scaled) original area still visible.
MIN_SIDE = 2.0
MAX_ASPECT = 20.0
MIN_AREA_RATIO = 0.1
# Upstream's visible-area threshold when boxes come from warped segments.
SEGMENT_MIN_AREA_RATIO = 0.01
# Upstream resamples every segment to this many points before warping it.
RESAMPLE_POINTS = 1000
# Upstream's paste_in: the sides of the candidate regions as fractions of the image
# side (one attempt each), the chance that an attempt is skipped, the most that a
# region may cover of an existing box, the least a region must exceed a side (pixels),
# the least a resized object must exceed a side (pixels), the least visible mask
# pixels, and how many objects are gathered before pasting.
PASTE_SCALES = (0.75,) * 2 + (0.5,) * 4 + (0.25,) * 4 + (0.125,) * 4 + (0.0625,) * 6
PASTE_SKIP = 0.2
PASTE_MAX_IOA = 0.3
PASTE_MIN_REGION = 20
PASTE_MIN_OBJECT = 10
PASTE_MIN_PIXELS = 20
PASTE_POOL = 30
# Upstream's paste_in cuts a random half of a pool mosaic's objects.
CUT_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation hyper-parameters; the defaults are ``hyp.scratch.p6``.

  Attributes:
    hsv_h: hue gain; hue is multiplied by a factor drawn from ``1 +- hsv_h``.
    hsv_s: saturation gain, as ``hsv_h``.
    hsv_v: value (brightness) gain, as ``hsv_h``.
    degrees: rotation drawn from ``+- degrees``.
    translate: the output centre moves by up to ``+- translate`` of the side.
    scale: zoom drawn from ``[1 - scale, 1.1 + scale]``.
    shear: shear angles drawn from ``+- shear`` degrees.
    perspective: perspective coefficients drawn from ``+- perspective``.
    flipud: probability of an up-down flip.
    fliplr: probability of a left-right flip.
    mosaic: probability that a sample is a mosaic.
    mixup: probability that a mosaic is blended with a second mosaic.
    paste_in: probability that objects cut out of other images by their
      segments are pasted into a sample where they cover existing boxes little
      (upstream's ``paste_in``); only datasets with segment labels have any.
    mosaic9: probability that a mosaic (also mixup's second one) has 9 images
      rather than 4. Not a ``hyp`` key: upstream's code fixes it at 0.2; the
      default 0 keeps to 4-image mosaics.
  """

  hsv_h: float = 0.015
  hsv_s: float = 0.7
  hsv_v: float = 0.4
  degrees: float = 0.0
  translate: float = 0.2
  scale: float = 0.9
  shear: float = 0.0
  perspective: float = 0.0
  flipud: float = 0.0
  fliplr: float = 0.5
  mosaic: float = 1.0
  mixup: float = 0.15
  paste_in: float = 0.15
  mosaic9: float = 0.0

  def __post_init__(self):
    for name in ('flipud', 'fliplr', 'mosaic', 'mixup', 'paste_in', 'mosaic9'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} is a probability and must lie in [0, 1], got {value}')
    for name in ('hsv_h', 'hsv_s', 'hsv_v', 'degrees', 'translate', 'shear', 'perspective'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if not 0.0 <= self.scale < 1.0:
      raise ValueError(f'scale must lie in [0, 1) so that zoom stays positive, got {self.scale}')


def empty_labels() -> np.ndarray:
  """``[0, 5]`` float32 labels."""
  return np.zeros((0, 5), np.float32)


def normalized_to_pixels(
  labels: np.ndarray, *, width: float, height: float, offset_x: float = 0.0, offset_y: float = 0.0
) -> np.ndarray:
  """``[N, 5]`` normalised ``(class, cx, cy, w, h)`` to pixel ``(class, x1, y1, x2, y2)``.

  ``width``/``height`` are the size of the image the labels refer to, and
  ``offset_x``/``offset_y`` where its top-left corner lies in the output.
  """
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  cls, cx, cy, w, h = labels.T
  x1 = (cx - w / 2) * width + offset_x
  y1 = (cy - h / 2) * height + offset_y
  x2 = (cx + w / 2) * width + offset_x
  y2 = (cy + h / 2) * height + offset_y
  return np.stack([cls, x1, y1, x2, y2], axis=1).astype(np.float32)


def pixels_to_normalized(labels: np.ndarray, *, width: float, height: float) -> np.ndarray:
  """``[N, 5]`` pixel ``(class, x1, y1, x2, y2)`` to normalised ``(class, cx, cy, w, h)``."""
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  cls, x1, y1, x2, y2 = labels.T
  return np.stack(
    [cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height],
    axis=1,
  ).astype(np.float32)


def fit_long_side(image: np.ndarray, *, size: int, antialias: bool) -> np.ndarray:
  """Resizes ``[H, W, 3]`` so that its longer side is ``size``, keeping the aspect ratio.

  Normalised labels stay valid. ``antialias`` uses area interpolation when
  shrinking (upstream's choice without augmentation); otherwise bilinear.
  """
  h, w = image.shape[:2]
  ratio = size / max(h, w)
  if ratio == 1:
    return image
  new_w, new_h = max(1, int(w * ratio)), max(1, int(h * ratio))
  interpolation = cv2.INTER_AREA if antialias and ratio < 1 else cv2.INTER_LINEAR
  return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def letterbox(
  image: np.ndarray, labels: np.ndarray, *, size: tuple[int, int], scaleup: bool
) -> tuple[np.ndarray, np.ndarray, float, tuple[int, int]]:
  """Resizes keeping the aspect ratio, then pads with grey to exactly ``size``.

  Args:
    image: ``[H, W, 3]`` uint8.
    labels: ``[N, 5]`` pixel labels of ``image``.
    size: output ``(height, width)``.
    scaleup: whether a smaller image may be enlarged (otherwise only padded).

  Returns:
    ``(image, labels, ratio, (left, top))``: the ``[height, width, 3]`` image,
    the labels in its pixels, the resize factor, and the padding added on the
    left and top (any odd pixel of padding goes to the right/bottom). An input
    point ``p`` lands at ``p * ratio + (left, top)``.
  """
  out_h, out_w = size
  h, w = image.shape[:2]
  ratio = min(out_h / h, out_w / w)
  if not scaleup:
    ratio = min(ratio, 1.0)
  new_w, new_h = round(w * ratio), round(h * ratio)
  if (new_w, new_h) != (w, h):
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
  canvas = np.full((out_h, out_w, image.shape[2]), PAD_VALUE, np.uint8)
  canvas[top : top + new_h, left : left + new_w] = image
  labels = np.array(labels, np.float32).reshape(-1, 5)
  labels[:, [1, 3]] = labels[:, [1, 3]] * (new_w / w) + left
  labels[:, [2, 4]] = labels[:, [2, 4]] * (new_h / h) + top
  return canvas, labels, ratio, (left, top)


def augment_hsv(
  image: np.ndarray, *, rng: np.random.Generator, hgain: float, sgain: float, vgain: float
) -> np.ndarray:
  """Multiplies hue, saturation and value by factors drawn from ``1 +- gain``.

  Hue wraps around (OpenCV's 8-bit hue spans ``[0, 180)``); saturation and
  value saturate at 255. Returns a new ``[H, W, 3]`` uint8 RGB image.
  """
  gains = 1 + rng.uniform(-1, 1, 3) * np.asarray([hgain, sgain, vgain])
  levels = np.arange(256, dtype=np.float64)
  tables = [
    np.mod(levels * gains[0], 180).astype(np.uint8),
    np.clip(levels * gains[1], 0, 255).astype(np.uint8),
    np.clip(levels * gains[2], 0, 255).astype(np.uint8),
  ]
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  channels = [cv2.LUT(hsv[..., c], tables[c]) for c in range(3)]
  return cv2.cvtColor(np.stack(channels, axis=-1), cv2.COLOR_HSV2RGB)


def flip_lr(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors image and pixel labels left-right."""
  width = image.shape[1]
  labels = np.array(labels, np.float32).reshape(-1, 5)
  labels[:, [1, 3]] = width - labels[:, [3, 1]]
  return np.ascontiguousarray(image[:, ::-1]), labels


def flip_ud(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors image and pixel labels up-down."""
  height = image.shape[0]
  labels = np.array(labels, np.float32).reshape(-1, 5)
  labels[:, [2, 4]] = height - labels[:, [4, 2]]
  return np.ascontiguousarray(image[::-1]), labels


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
    degrees, translate, scale, shear, perspective: ranges as in :class:`AugmentConfig`.

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
  """``[N, 4]`` ``(x1, y1, x2, y2)`` boxes as ``[4, 2]`` rectangles (for rows without a polygon)."""
  return [
    np.asarray([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4)
  ]


def bbox_ioa(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """``[N]`` intersection of ``box`` ``[4]`` with each of ``boxes`` ``[N, 4]`` over that box's area."""
  boxes = np.asarray(boxes).reshape(-1, 4)
  iw = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0)
  ih = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(0)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + 1e-16
  return iw * ih / area


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
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
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
  """:func:`affine_matrix` then :func:`warp`; ranges as in :class:`AugmentConfig`.

  Args:
    image: ``[H, W, 3]`` uint8, e.g. a ``[2S, 2S]`` mosaic canvas.
    labels: ``[N, 5]`` pixel labels of ``image``.
    rng: source of the random draws.
    out_size: output ``(height, width)``, e.g. ``(S, S)``.
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


Tile = tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Sequence[np.ndarray]]
"""A mosaic tile: ``(image [H, W, 3] uint8, labels [N, 5] normalised (class, cx, cy, w, h))``,
optionally with its ``N`` normalised ``[P_i, 2]`` segments (an empty sequence: none)."""


def _draw(
  images: Sequence[np.ndarray], *, side: int, corners: Sequence[tuple[int, int]]
) -> np.ndarray:
  """A ``[side, side, 3]`` grey canvas with ``images[k]``'s top-left corner at
  ``corners[k]`` ``(x, y)`` (later images over earlier ones), cut to the canvas."""
  canvas = np.full((side, side, 3), PAD_VALUE, np.uint8)
  for image, (left, top) in zip(images, corners, strict=True):
    h, w = image.shape[:2]
    x0, x1 = max(left, 0), min(left + w, side)
    y0, y1 = max(top, 0), min(top + h, side)
    if x1 > x0 and y1 > y0:
      canvas[y0:y1, x0:x1] = image[y0 - top : y1 - top, x0 - left : x1 - left]
  return canvas


def _place_labels(
  tiles: Sequence[Tile], *, side: int, corners: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, list[np.ndarray] | None]:
  """The tiles' labels (and segments) moved to ``corners`` and clipped to ``[0, side]``.

  Segments come out for every row when any tile has some (a tile without
  contributes its boxes' rectangles), else ``None``.
  """
  with_segments = any(len(tile) > 2 and len(tile[2]) for tile in tiles)
  placed, outlines = [], []
  for tile, (left, top) in zip(tiles, corners, strict=True):
    image, labels = tile[0], tile[1]
    h, w = image.shape[:2]
    boxes = normalized_to_pixels(labels, width=w, height=h, offset_x=left, offset_y=top)
    placed.append(boxes)
    if not with_segments:
      continue
    own = tile[2] if len(tile) > 2 else ()
    if len(own) and len(own) != len(boxes):
      raise ValueError(f'a tile has {len(own)} segments for {len(boxes)} label rows')
    if len(own):
      scale, offset = np.float32([w, h]), np.float32([left, top])
      outlines += [np.asarray(p, np.float32) * scale + offset for p in own]
    else:
      outlines += box_segments(boxes[:, 1:])
  boxes = np.concatenate(placed, axis=0)
  boxes[:, 1:] = boxes[:, 1:].clip(0, side)
  return boxes, [p.clip(0, side) for p in outlines] if with_segments else None


def mosaic(
  tiles: Sequence[Tile], *, size: int, center: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
  """Places four images around a centre point of a ``[2S, 2S]`` grey canvas.

  Tile 0 ends at the centre from the top left, tile 1 from the top right,
  tile 2 from the bottom left and tile 3 from the bottom right; parts that
  fall outside the canvas are cut off and their boxes (and segments) clipped
  to the canvas (boxes left with no area are removed later by :func:`warp`).

  Args:
    tiles: four :data:`Tile` s, usually each resized with :func:`fit_long_side` to ``S``.
    size: ``S``.
    center: ``(x, y)`` of the meeting point in canvas pixels.

  Returns:
    ``([2S, 2S, 3] canvas, [sum N_i, 5] pixel labels, segments)``: segments
    is one ``[P, 2]`` pixel polygon per label row when any tile has segments
    (a tile without contributes its boxes' rectangles), else ``None``.
  """
  if len(tiles) != 4:
    raise ValueError(f'a mosaic needs 4 tiles, got {len(tiles)}')
  xc, yc = center
  corners = []
  for k, tile in enumerate(tiles):
    h, w = tile[0].shape[:2]
    corners.append((xc - w if k in (0, 2) else xc, yc - h if k in (0, 1) else yc))
  canvas = _draw([tile[0] for tile in tiles], side=2 * size, corners=corners)
  return (canvas, *_place_labels(tiles, side=2 * size, corners=corners))


def mosaic9(
  tiles: Sequence[Tile], *, size: int, offset: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
  """Upstream's 9-image mosaic: eight images around a first one, seen through a ``[2S, 2S]`` window.

  On a ``[3S, 3S]`` layout the first tile's top-left corner sits at ``(S, S)``;
  tiles 1 to 8 go above it, above right of tile 1, to its right, below the
  right tile, below it, to the left of the tile below, to its left, and above
  the left tile, each aligned on the side it shares with its neighbour (as
  upstream's ``load_mosaic9``). The window's top-left corner is at ``offset``
  ``(x, y)``, each in ``[0, S)``.

  Args:
    tiles: nine :data:`Tile` s, usually each resized with :func:`fit_long_side` to ``S``.
    size: ``S``.
    offset: the window's top-left corner in layout pixels.

  Returns:
    As :func:`mosaic`: ``([2S, 2S, 3] canvas, [sum N_i, 5] pixel labels, segments)``.
  """
  if len(tiles) != 9:
    raise ValueError(f'a 9-image mosaic needs 9 tiles, got {len(tiles)}')
  s = size
  h = [tile[0].shape[0] for tile in tiles]
  w = [tile[0].shape[1] for tile in tiles]
  h0, w0 = h[0], w[0]
  # Top-left corners (x, y) on the [3S, 3S] layout.
  layout = [
    (s, s),  # The first image.
    (s, s - h[1]),  # Above it.
    (s + w[1], s - h[2]),  # Right of the one above.
    (s + w0, s),  # Right of it.
    (s + w0, s + h[3]),  # Below the right one.
    (s + w0 - w[5], s + h0),  # Below it, right-aligned.
    (s + w0 - w[5] - w[6], s + h0),  # Left of the one below.
    (s - w[7], s + h0 - h[7]),  # Left of it, bottom-aligned.
    (s - w[8], s + h0 - h[7] - h[8]),  # Above the left one.
  ]
  xo, yo = offset
  # Images are cut at the layout's own top and left edges before the window moves over it.
  images, corners = [], []
  for tile, (left, top) in zip(tiles, layout, strict=True):
    cut_x, cut_y = max(0, -left), max(0, -top)
    images.append(tile[0][cut_y:, cut_x:])
    corners.append((left + cut_x - xo, top + cut_y - yo))
  canvas = _draw(images, side=2 * s, corners=corners)
  moved = [(left - xo, top - yo) for left, top in layout]
  return (canvas, *_place_labels(tiles, side=2 * s, corners=moved))


def random_mosaic(
  tiles: Sequence[Tile],
  *,
  rng: np.random.Generator,
  size: int,
  config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
  """A 4- or 9-image mosaic (by the number of tiles), warped by a random affine down to ``[S, S]``.

  A 4-image mosaic meets at a centre drawn uniformly from the middle half of
  the canvas; a 9-image one is seen through a window whose corner is drawn
  uniformly from ``[0, S)`` a side. The warp (with the geometric ranges of
  ``config``) maps the canvas centre to the output centre, jittered by
  ``translate``, as upstream's mosaics; with segments it is segment-aware
  (:func:`warp`).

  Returns:
    ``([S, S, 3] image, [N, 5] pixel labels)``.
  """
  if len(tiles) == 9:
    offset = tuple(int(v) for v in rng.uniform(0, size, 2))
    canvas, labels, segments = mosaic9(tiles, size=size, offset=offset)
  else:
    center = tuple(int(v) for v in rng.uniform(size // 2, size + size // 2, 2))
    canvas, labels, segments = mosaic(tiles, size=size, center=center)
  return random_affine(
    canvas,
    labels,
    rng=rng,
    out_size=(size, size),
    degrees=config.degrees,
    translate=config.translate,
    scale=config.scale,
    shear=config.shear,
    perspective=config.perspective,
    segments=segments,
  )


def cut_objects(
  image: np.ndarray,
  labels: np.ndarray,
  segments: Sequence[np.ndarray],
  *,
  rng: np.random.Generator,
  fraction: float = CUT_FRACTION,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """Cuts a random ``fraction`` of the objects out of an image by their polygons (for :func:`paste_in`).

  ``round(fraction * N)`` distinct rows are drawn; each object's crop is its
  box truncated to whole pixels (an empty crop is skipped), its mask the
  filled polygon within that crop.

  Args:
    image: ``[H, W, 3]`` uint8.
    labels: ``[N, 5]`` pixel labels of ``image``.
    segments: ``N`` ``[P_i, 2]`` pixel polygons.
    rng: source of the draws.
    fraction: share of the objects cut out.

  Returns:
    ``(class, patch [h, w, 3] uint8 (zero outside the mask), mask [h, w] bool)`` per object.
  """
  h, w = image.shape[:2]
  count = round(fraction * len(segments))
  if not count:
    return []
  out = []
  for j in rng.choice(len(segments), size=count, replace=False).tolist():
    x1, y1, x2, y2 = labels[j, 1:].astype(int)
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
    if x2 <= x1 or y2 <= y1:
      continue
    full = np.zeros((h, w), np.uint8)
    cv2.drawContours(full, [np.asarray(segments[j]).astype(np.int32)], -1, 1, cv2.FILLED)
    mask = full[y1:y2, x1:x2].astype(bool)
    patch = np.where(mask[..., None], image[y1:y2, x1:x2], 0).astype(np.uint8)
    out.append((int(labels[j, 0]), patch, mask))
  return out


def paste_in(
  image: np.ndarray,
  labels: np.ndarray,
  objects: Sequence[tuple[int, np.ndarray, np.ndarray]],
  *,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Upstream's ``paste_in``: pastes cut-out objects where they cover existing boxes little.

  One attempt per entry of :data:`PASTE_SCALES` ``f``, each skipped with
  probability :data:`PASTE_SKIP`: a region of ``1..int(f H)`` by
  ``1..int(f W)`` pixels is centred on a uniform point (cut at the image's
  top/left edge); when it is over :data:`PASTE_MIN_REGION` pixels a side and
  covers at most :data:`PASTE_MAX_IOA` of every box so far (pasted ones
  included), a random object is resized to fit it (aspect kept, top-left
  aligned); if both sides exceed :data:`PASTE_MIN_OBJECT` and its mask keeps
  over :data:`PASTE_MIN_PIXELS` pixels, the masked pixels replace the image's
  and the resized object's rectangle becomes a new box.

  Args:
    image: ``[H, W, 3]`` uint8.
    labels: ``[N, 5]`` pixel labels of ``image``.
    objects: from :func:`cut_objects`.
    rng: source of the draws.

  Returns:
    ``(image [H, W, 3], labels [N + pasted, 5])``.
  """
  image = np.array(image)
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  h, w = image.shape[:2]
  added = []
  for fraction in PASTE_SCALES:
    if rng.random() < PASTE_SKIP:
      continue
    region_h = int(rng.integers(1, max(1, int(h * fraction)) + 1))
    region_w = int(rng.integers(1, max(1, int(w * fraction)) + 1))
    xmin = max(0, int(rng.integers(0, w + 1)) - region_w // 2)
    ymin = max(0, int(rng.integers(0, h + 1)) - region_h // 2)
    xmax, ymax = min(w, xmin + region_w), min(h, ymin + region_h)
    boxes = np.concatenate([labels[:, 1:], np.asarray(added, np.float32).reshape(-1, 5)[:, 1:]])
    region = np.asarray([xmin, ymin, xmax, ymax], np.float32)
    free = not len(boxes) or (bbox_ioa(region, boxes) < PASTE_MAX_IOA).all()
    big = xmax > xmin + PASTE_MIN_REGION and ymax > ymin + PASTE_MIN_REGION
    if not (free and len(objects) and big):
      continue
    cls, patch, mask = objects[int(rng.integers(0, len(objects)))]
    ph, pw = patch.shape[:2]
    ratio = min((ymax - ymin) / ph, (xmax - xmin) / pw)
    new_w, new_h = int(pw * ratio), int(ph * ratio)
    if new_w <= PASTE_MIN_OBJECT or new_h <= PASTE_MIN_OBJECT:
      continue
    mask = cv2.resize(mask.astype(np.uint8) * 255, (new_w, new_h)) > 0
    if mask.sum() <= PASTE_MIN_PIXELS:
      continue
    patch = cv2.resize(patch, (new_w, new_h))
    crop = image[ymin : ymin + new_h, xmin : xmin + new_w]
    crop[mask] = patch[mask]
    added.append([cls, xmin, ymin, xmin + new_w, ymin + new_h])
  if not added:
    return image, labels
  return image, np.concatenate([labels, np.asarray(added, np.float32)], axis=0)


def mixup(
  first: tuple[np.ndarray, np.ndarray],
  second: tuple[np.ndarray, np.ndarray],
  *,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Blends two same-sized images with a ratio drawn from Beta(8, 8); keeps both label sets."""
  (image1, labels1), (image2, labels2) = first, second
  if image1.shape != image2.shape:
    raise ValueError(f'mixup needs images of one shape, got {image1.shape} and {image2.shape}')
  ratio = rng.beta(8.0, 8.0)
  blended = image1.astype(np.float32) * ratio + image2.astype(np.float32) * (1 - ratio)
  return blended.astype(np.uint8), np.concatenate([labels1, labels2], axis=0)
