"""A built-in synthetic detection dataset: coloured shapes on textured backgrounds.

Glossary: ``N`` label rows (one per drawn object) of an image, ``H``/``W``
image height/width, ``P`` points of an outline.

Each image is a pure function of ``(seed, index)``: a background (gradient,
stripes or blotchy noise, all low in saturation) with up to a few
non-overlapping, saturated shapes of six classes (:data:`CLASS_NAMES`). The
labels are the exact bounding boxes of the drawn pixels, so a small detector
can learn the task quickly and a perfect one scores exactly. :func:`write_dataset`
stores such images in the YOLO layout that :mod:`reorg_jax.data.dataset` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import yaml

from reorg_jax import boxes as box_lib

__all__ = [
  'CLASS_NAMES',
  'ELLIPSE_VERTICES',
  'PALETTE',
  'STREAM',
  'format_labels',
  'make_image',
  'write_dataset',
]

CLASS_NAMES = ('box', 'frame', 'disc', 'ring', 'triangle', 'cross')
# Saturated RGB colours for the shapes; backgrounds stay greyish, so every shape stands out.
PALETTE = (
  (230, 40, 40),
  (40, 200, 60),
  (50, 90, 235),
  (240, 210, 30),
  (220, 50, 220),
  (30, 210, 220),
  (250, 130, 20),
)
# Draw seeds are (seed, index, STREAM): a nonzero tag keeps them apart from other uses of a seed.
STREAM = 7
# Vertices of the polygon outlining a disc or ring (a multiple of 4, so that the
# ellipse's extreme points are vertices).
ELLIPSE_VERTICES = 32


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """``[H, W, 3]`` uint8 low-saturation texture."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  base = rng.uniform(60, 190)
  kind = rng.integers(3)
  if kind == 0:  # Linear gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / max(height, width)
    gray = base + rng.uniform(20, 60) * ramp
  elif kind == 1:  # Stripes.
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 40)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period
    gray = base + rng.uniform(10, 35) * np.sin(phase)
  else:  # Smoothed noise blotches.
    coarse = rng.normal(0, 1, (max(2, height // 16), max(2, width // 16))).astype(np.float32)
    gray = base + 25 * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  tint = rng.uniform(-12, 12, 3)
  grain = rng.normal(0, 6, (height, width, 3))
  return np.clip(gray[..., None] + tint + grain, 0, 255).astype(np.uint8)


def _shape_mask(
  rng: np.random.Generator, cls: int, height: int, width: int, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Shape ``cls`` drawn inside ``box = (x1, y1, x2, y2)``: ``[H, W]`` bool pixels and the
  ``[P, 2]`` float64 outline in pixel-edge coordinates (draws nothing more from ``rng``)."""
  x1, y1, x2, y2 = box
  w, h = x2 - x1, y2 - y1
  mask = np.zeros((height, width), np.uint8)
  thickness = max(2, round(min(w, h) * rng.uniform(0.15, 0.25)))
  name = CLASS_NAMES[cls]
  rectangle = np.asarray([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
  if name == 'box':
    cv2.rectangle(mask, (x1, y1), (x2 - 1, y2 - 1), 1, thickness=-1)
    outline = rectangle
  elif name == 'frame':
    mask[y1:y2, x1:x2] = 1
    mask[y1 + thickness : y2 - thickness, x1 + thickness : x2 - thickness] = 0
    outline = rectangle
  elif name in ('disc', 'ring'):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    rx, ry = w / 2, h / 2
    outer = ((xx - rx) / rx) ** 2 + ((yy - ry) / ry) ** 2 <= 1
    if name == 'ring':
      outer &= ((xx - rx) / (rx - thickness)) ** 2 + ((yy - ry) / (ry - thickness)) ** 2 > 1
    mask[y1:y2, x1:x2] = outer
    angle = np.arange(ELLIPSE_VERTICES) * 2 * np.pi / ELLIPSE_VERTICES
    outline = np.stack([x1 + rx * (1 + np.cos(angle)), y1 + ry * (1 + np.sin(angle))], axis=1)
  elif name == 'triangle':
    apex = x1 + int(rng.integers(0, w))
    points = np.asarray([[apex, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], np.int32)
    # Pixel edges: apex pixel's centre at the top, the base along the bottom edge.
    outline = np.asarray([[apex + 0.5, y1], [x2, y2], [(x1 + x2) / 2, y2], [x1, y2]], np.float64)
    if rng.random() < 0.5:  # Upside down.
      points[:, 1] = y1 + y2 - 1 - points[:, 1]
      outline[:, 1] = y1 + y2 - outline[:, 1]
    cv2.fillPoly(mask, [points], 1)
  else:  # Cross: a horizontal and a vertical bar.
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = thickness // 2 + 1
    mask[y1:y2, cx - half : cx + half] = 1
    mask[cy - half : cy + half, x1:x2] = 1
    a, b, c, d = cx - half, cx + half, cy - half, cy + half
    outline = np.asarray(
      [[a, y1], [b, y1], [b, c], [x2, c], [x2, d], [b, d]]
      + [[b, y2], [a, y2], [a, d], [x1, d], [x1, c], [a, c]],
      np.float64,
    )
  return mask.astype(bool), outline


def make_image(
  seed: int,
  index: int,
  *,
  image_size: int | tuple[int, int],
  max_objects: int = 6,
  min_size: float = 0.04,
  max_size: float = 0.35,
  with_polygons: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """Draws image ``index`` of the dataset of ``seed``.

  Args:
    seed: dataset seed (non-negative).
    index: image number (non-negative); each is independent of the others.
    image_size: side, or ``(height, width)``, in pixels (at least 32).
    max_objects: an image holds 1 to this many shapes (fewer when they do not fit).
    min_size: smallest shape side as a fraction of the shorter image side
      (never below 8 pixels; 0.04 is about 10 pixels at 256).
    max_size: largest shape side, same units.
    with_polygons: also return the shapes' outlines (the image and labels do
      not depend on it).

  Returns:
    ``(image, labels)``: ``[H, W, 3]`` uint8 RGB and ``[N, 5]`` float32 rows
    ``(class, cx, cy, w, h)``, the tight normalised boxes of the drawn shapes;
    with ``with_polygons``, third, ``N`` float32 ``[P_i, 2]`` normalised
    ``(x, y)`` outlines whose bounding boxes are the labels' boxes.
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  if min(height, width) < 32:
    raise ValueError(f'image_size must be at least 32 pixels a side, got {image_size}')
  if seed < 0 or index < 0:
    raise ValueError(f'seed and index must be non-negative, got {seed} and {index}')
  if not 0 < min_size <= max_size <= 1:
    raise ValueError(f'need 0 < min_size <= max_size <= 1, got {min_size} and {max_size}')
  rng = np.random.default_rng([seed, index, STREAM])
  image = _background(rng, height, width)
  short = min(height, width)
  lo, hi = max(8, round(min_size * short)), max(8, round(max_size * short))
  taken = np.zeros((height, width), bool)
  rows, polygons = [], []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    for _attempt in range(20):
      w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
      x1, y1 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      gap = 2
      if not taken[max(0, y1 - gap) : y1 + h + gap, max(0, x1 - gap) : x1 + w + gap].any():
        break
    else:
      continue  # No room left for this shape.
    cls = int(rng.integers(len(CLASS_NAMES)))
    mask, outline = _shape_mask(rng, cls, height, width, (x1, y1, x1 + w, y1 + h))
    colour = np.asarray(PALETTE[rng.integers(len(PALETTE))], np.float32) * rng.uniform(0.75, 1.0)
    image[mask] = colour.astype(np.uint8)
    taken[y1 : y1 + h, x1 : x1 + w] = True
    ys, xs = np.nonzero(mask)
    bx1, bx2, by1, by2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # The outline, stretched so that its bounding box is exactly the drawn pixels' box.
    low, high = outline.min(axis=0), outline.max(axis=0)
    tight = (outline - low) / (high - low) * [bx2 - bx1, by2 - by1] + [bx1, by1]
    polygons.append((tight / [width, height]).astype(np.float32))
    box = box_lib.pixel_xyxy_to_normalized_cxcywh(
      np.asarray([bx1, by1, bx2, by2]), width=width, height=height, xp=np
    )
    rows.append([cls, *box.tolist()])
  labels = np.asarray(rows, np.float32).reshape(-1, 5)
  return (image, labels, polygons) if with_polygons else (image, labels)


def format_labels(labels: np.ndarray, polygons: list[np.ndarray] | None = None) -> str:
  """``[N, 5]`` rows as the text of a YOLO label file; with ``polygons`` (``N`` normalised
  ``[P_i, 2]``), polygon rows ``class x1 y1 ... xk yk`` instead of boxes."""
  if polygons is None:
    return ''.join(
      f'{int(row[0])} {row[1]:.6f} {row[2]:.6f} {row[3]:.6f} {row[4]:.6f}\n' for row in labels
    )
  if len(polygons) != len(labels):
    raise ValueError(f'{len(polygons)} polygons for {len(labels)} label rows')
  return ''.join(
    f'{int(row[0])} ' + ' '.join(f'{v:.6f}' for v in polygon.reshape(-1)) + '\n'
    for row, polygon in zip(labels, polygons, strict=True)
  )


def write_dataset(
  root: str | os.PathLike,
  *,
  num_train: int,
  num_val: int,
  image_size: int | tuple[int, int],
  seed: int,
  polygons: bool = False,
) -> Path:
  """Writes a synthetic dataset in YOLO layout under ``root``.

  Creates ``images/{train,val}/NNNNNN.png``, ``labels/{train,val}/NNNNNN.txt``
  and ``data.yaml`` (``train``, ``val``, ``nc``, ``names``). Training images
  are indices ``0 .. num_train - 1`` of :func:`make_image`, validation images
  the next ``num_val``; rewriting with the same arguments gives identical files.
  With ``polygons``, label rows are the shapes' outlines (segment labels)
  rather than boxes; the images are the same.

  Returns:
    Path of ``data.yaml``.
  """
  if num_train < 1 or num_val < 1:
    raise ValueError(f'need at least one image per split, got {num_train} and {num_val}')
  root = Path(root)
  splits = {'train': range(num_train), 'val': range(num_train, num_train + num_val)}
  for split, indices in splits.items():
    image_dir, label_dir = root / 'images' / split, root / 'labels' / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for index in indices:
      image, labels, outlines = make_image(seed, index, image_size=image_size, with_polygons=True)
      stem = f'{index:06d}'
      if not cv2.imwrite(str(image_dir / f'{stem}.png'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f'cannot write {image_dir / stem}.png')
      text = format_labels(labels, outlines if polygons else None)
      (label_dir / f'{stem}.txt').write_text(text)
  config = {
    'train': 'images/train',
    'val': 'images/val',
    'nc': len(CLASS_NAMES),
    'names': list(CLASS_NAMES),
  }
  path = root / 'data.yaml'
  path.write_text(yaml.safe_dump(config, sort_keys=False))
  return path
