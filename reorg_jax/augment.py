"""Image and box augmentations of YOLOv7's training recipe, on the host (NumPy/OpenCV).

Glossary: ``N`` boxes, ``H``/``W`` image height/width in pixels, ``S`` output
side of a square training image.

Every function is pure: it returns new arrays and draws randomness only from
the ``np.random.Generator`` it is given, so a seeded generator reproduces a
sample exactly. Images are ``[H, W, 3]`` uint8 RGB. Inside this module labels
are ``[N, 5]`` float32 rows ``(class, x1, y1, x2, y2)`` in pixels of the image
they travel with; :func:`normalized_to_pixels` and :func:`pixels_to_normalized`
convert from and to the label files' normalised ``(class, cx, cy, w, h)``.

Boxes are only ever removed by :func:`box_candidates` after a geometric warp
(:func:`warp`), exactly where upstream removes them: boxes that end up smaller
than 2 pixels a side, with less than 10 % of their scaled area left inside the
image, or with an aspect ratio of 20 or more.
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
    mosaic: probability that a sample is a 4-image mosaic.
    mixup: probability that a mosaic is blended with a second mosaic.
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

  def __post_init__(self):
    for name in ('flipud', 'fliplr', 'mosaic', 'mixup'):
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


def warp(
  image: np.ndarray,
  labels: np.ndarray,
  *,
  matrix: np.ndarray,
  out_size: tuple[int, int],
  area_scale: float,
) -> tuple[np.ndarray, np.ndarray]:
  """Warps an image and its boxes with a pixel transform, dropping degenerate boxes.

  Each box becomes the bounding box of its four transformed corners, clipped
  to the output; then :func:`box_candidates` removes boxes that became too
  small, mostly invisible or too thin.

  Args:
    image: ``[H, W, 3]`` uint8.
    labels: ``[N, 5]`` pixel labels of ``image``.
    matrix: ``[3, 3]`` transform from input to output pixels (affine when its
      last row is ``(0, 0, 1)``).
    out_size: output ``(height, width)``.
    area_scale: area factor of the warp, passed to :func:`box_candidates`.

  Returns:
    ``([height, width, 3] image, [N', 5] labels)`` with ``N' <= N``.
  """
  out_h, out_w = out_size
  fill = (PAD_VALUE,) * 3
  projective = not np.allclose(matrix[2], (0, 0, 1))
  if projective:
    image = cv2.warpPerspective(image, matrix, dsize=(out_w, out_h), borderValue=fill)
  elif image.shape[:2] != (out_h, out_w) or not np.allclose(matrix, np.eye(3)):
    image = cv2.warpAffine(image, matrix[:2], dsize=(out_w, out_h), borderValue=fill)
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  if not len(labels):
    return image, empty_labels()
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
  points = np.concatenate([corners, np.ones(corners.shape[:2] + (1,))], axis=-1) @ matrix.T
  xy = points[..., :2] / points[..., 2:] if projective else points[..., :2]
  boxes = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)
  boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
  boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
  keep = box_candidates(labels[:, 1:], boxes, area_scale=area_scale)
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
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`affine_matrix` then :func:`warp`; ranges as in :class:`AugmentConfig`.

  Args:
    image: ``[H, W, 3]`` uint8, e.g. a ``[2S, 2S]`` mosaic canvas.
    labels: ``[N, 5]`` pixel labels of ``image``.
    rng: source of the random draws.
    out_size: output ``(height, width)``, e.g. ``(S, S)``.

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
  return warp(image, labels, matrix=matrix, out_size=out_size, area_scale=zoom**2)


def mosaic(
  tiles: Sequence[tuple[np.ndarray, np.ndarray]], *, size: int, center: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Places four images around a centre point of a ``[2S, 2S]`` grey canvas.

  Tile 0 ends at the centre from the top left, tile 1 from the top right,
  tile 2 from the bottom left and tile 3 from the bottom right; parts that
  fall outside the canvas are cut off and their boxes clipped to the canvas
  (boxes left with no area are removed later by :func:`warp`).

  Args:
    tiles: four ``(image [H_i, W_i, 3] uint8, labels [N_i, 5])`` pairs with
      normalised ``(class, cx, cy, w, h)`` labels, usually each resized with
      :func:`fit_long_side` to ``S``.
    size: ``S``.
    center: ``(x, y)`` of the meeting point in canvas pixels.

  Returns:
    ``([2S, 2S, 3] canvas, [sum N_i, 5] pixel labels)``.
  """
  if len(tiles) != 4:
    raise ValueError(f'a mosaic needs 4 tiles, got {len(tiles)}')
  side = 2 * size
  xc, yc = center
  canvas = np.full((side, side, 3), PAD_VALUE, np.uint8)
  placed = []
  for k, (image, labels) in enumerate(tiles):
    h, w = image.shape[:2]
    left = xc - w if k in (0, 2) else xc
    top = yc - h if k in (0, 1) else yc
    x0, x1 = max(left, 0), min(left + w, side)
    y0, y1 = max(top, 0), min(top + h, side)
    if x1 > x0 and y1 > y0:
      canvas[y0:y1, x0:x1] = image[y0 - top : y1 - top, x0 - left : x1 - left]
    placed.append(normalized_to_pixels(labels, width=w, height=h, offset_x=left, offset_y=top))
  boxes = np.concatenate(placed, axis=0)
  boxes[:, 1:] = boxes[:, 1:].clip(0, side)
  return canvas, boxes


def random_mosaic(
  tiles: Sequence[tuple[np.ndarray, np.ndarray]],
  *,
  rng: np.random.Generator,
  size: int,
  config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
  """A mosaic around a random centre, warped by a random affine down to ``[S, S]``.

  The centre is drawn uniformly from the middle half of the canvas, and the
  warp (with the geometric ranges of ``config``) maps the canvas centre to
  the output centre, jittered by ``translate``, as upstream's mosaic.

  Returns:
    ``([S, S, 3] image, [N, 5] pixel labels)``.
  """
  center = tuple(int(v) for v in rng.uniform(size // 2, size + size // 2, 2))
  canvas, labels = mosaic(tiles, size=size, center=center)
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
  )


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
