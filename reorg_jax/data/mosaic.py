"""Samples built from several images: 4- and 9-image mosaics, paste_in, mixup.

Glossary: ``N`` label rows (boxes) of an image, ``H``/``W`` image height/width
in pixels, ``S`` output side of a square training image (a mosaic canvas is
``[2S, 2S]``), ``P`` points of a polygon.

Labels are ``[N, 5]`` float32 pixel rows ``(class, x1, y1, x2, y2)`` and
segments ``N`` ``[P_i, 2]`` pixel polygons, as in :mod:`reorg_jax.data.augment`;
a :data:`Tile` brings its image's labels (and segments) normalised, as a
label file has them. Every function is pure and draws only from the
``np.random.Generator`` it is given.

A mosaic places its tiles on a grey canvas, cuts them at its edges and clips
their boxes (and segments) to it; :func:`random_mosaic` then warps it down to
``[S, S]`` with :func:`reorg_jax.data.geometry.random_affine`, which is where
boxes left with too little area are removed. :func:`cut_objects` and
:func:`paste_in` are upstream's ``paste_in``: objects cut out of other images by
their segments, pasted where they cover existing boxes little.
:func:`mixup` blends two samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.data import geometry
from reorg_jax.data.augment import PAD_VALUE, AugmentConfig, normalized_to_pixels

__all__ = [
  'CUT_FRACTION',
  'PASTE_MAX_IOA',
  'PASTE_MIN_OBJECT',
  'PASTE_MIN_PIXELS',
  'PASTE_MIN_REGION',
  'PASTE_POOL',
  'PASTE_SCALES',
  'PASTE_SKIP',
  'Tile',
  'cut_objects',
  'mixup',
  'mosaic',
  'mosaic9',
  'paste_in',
  'random_mosaic',
]

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
    rows = normalized_to_pixels(labels, width=w, height=h, offset_x=left, offset_y=top)
    placed.append(rows)
    if not with_segments:
      continue
    own = tile[2] if len(tile) > 2 else ()
    if len(own) and len(own) != len(rows):
      raise ValueError(f'a tile has {len(own)} segments for {len(rows)} label rows')
    if len(own):
      scale, offset = np.float32([w, h]), np.float32([left, top])
      outlines += [np.asarray(p, np.float32) * scale + offset for p in own]
    else:
      outlines += geometry.box_segments(rows[:, 1:])
  rows = np.concatenate(placed, axis=0)
  rows[:, 1:] = box_lib.clip_xyxy(rows[:, 1:], width=side, height=side, xp=np)
  return rows, [p.clip(0, side) for p in outlines] if with_segments else None


def mosaic(
  tiles: Sequence[Tile], *, size: int, center: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
  """Places four images around a centre point of a ``[2S, 2S]`` grey canvas.

  Tile 0 ends at the centre from the top left, tile 1 from the top right,
  tile 2 from the bottom left and tile 3 from the bottom right; parts that
  fall outside the canvas are cut off and their boxes (and segments) clipped
  to the canvas (boxes left with no area are removed later by
  :func:`reorg_jax.data.geometry.warp`).

  Args:
    tiles: four :data:`Tile` s, usually each resized with
      :func:`reorg_jax.data.augment.fit_long_side` to ``S``.
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
    tiles: nine :data:`Tile` s, usually each resized with
      :func:`reorg_jax.data.augment.fit_long_side` to ``S``.
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
  (:func:`reorg_jax.data.geometry.warp`).

  Returns:
    ``([S, S, 3] image, [N, 5] pixel labels)``.
  """
  if len(tiles) == 9:
    offset = tuple(int(v) for v in rng.uniform(0, size, 2))
    canvas, labels, segments = mosaic9(tiles, size=size, offset=offset)
  else:
    center = tuple(int(v) for v in rng.uniform(size // 2, size + size // 2, 2))
    canvas, labels, segments = mosaic(tiles, size=size, center=center)
  return geometry.random_affine(
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
    crop = box_lib.clip_xyxy(labels[j, 1:].astype(int), width=w - 1, height=h - 1, xp=np)
    x1, y1, x2, y2 = crop.tolist()
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
    free = not len(boxes) or (box_lib.ioa_xyxy(region, boxes, xp=np) < PASTE_MAX_IOA).all()
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
  """Blends two same-sized images with a ratio drawn from Beta(8, 8); keeps both label sets.

  Args:
    first, second: ``(image [H, W, 3] uint8, labels [N_i, 5])`` samples of one shape.
    rng: source of the draw.

  Returns:
    ``(image [H, W, 3] uint8, labels [N_1 + N_2, 5])``.
  """
  (image1, labels1), (image2, labels2) = first, second
  if image1.shape != image2.shape:
    raise ValueError(f'mixup needs images of one shape, got {image1.shape} and {image2.shape}')
  ratio = rng.beta(8.0, 8.0)
  blended = image1.astype(np.float32) * ratio + image2.astype(np.float32) * (1 - ratio)
  return blended.astype(np.uint8), np.concatenate([labels1, labels2], axis=0)
