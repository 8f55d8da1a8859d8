"""YOLOv7's augmentation recipe: its settings and the per-image steps, on the host.

Glossary: ``N`` label rows (boxes) of an image, ``H``/``W`` image height/width
in pixels, ``S`` output side of a square training image, ``P`` points of a
polygon.

Every function is pure: it returns new arrays and draws randomness only from
the ``np.random.Generator`` it is given, so a seeded generator reproduces a
sample exactly. Images are ``[H, W, 3]`` uint8 RGB. Inside the augmentation
modules labels are ``[N, 5]`` float32 rows ``(class, x1, y1, x2, y2)`` in
pixels of the image they travel with; :func:`normalized_to_pixels` and
:func:`pixels_to_normalized` convert from and to the label files' normalised
``(class, cx, cy, w, h)`` (the box arithmetic is :mod:`reorg_jax.boxes`').

Segments (polygon outlines of the objects, as COCO's segment labels) travel
beside the labels as a list of ``[P, 2]`` float arrays ``(x, y)``, one per label
row, in the same pixels (normalised ``[0, 1]`` where they come from a label
file). They only change how a warp re-boxes an object and what
:func:`reorg_jax.data.mosaic.cut_objects` cuts out; samples leave augmentation
as boxes.

The recipe is split by concept: this module holds :class:`AugmentConfig`
(``hyp.scratch.p6``'s keys), the label-row conversions and the steps that
take one image (resizing, letterbox, HSV jitter, flips);
:mod:`reorg_jax.data.geometry` the random affine/perspective warp that
re-boxes (and drops) objects; :mod:`reorg_jax.data.mosaic` the samples built
from several images (mosaics, paste_in, mixup).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from reorg_jax import boxes as box_lib

__all__ = [
  'PAD_VALUE',
  'AugmentConfig',
  'augment_hsv',
  'empty_labels',
  'fit_long_side',
  'flip_lr',
  'flip_ud',
  'letterbox',
  'normalized_to_pixels',
  'pixels_to_normalized',
]

# Grey of the padding and of empty canvas areas, as upstream.
PAD_VALUE = 114


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
  xyxy = box_lib.normalized_cxcywh_to_pixel_xyxy(
    labels[:, 1:], width=width, height=height, offset_x=offset_x, offset_y=offset_y, xp=np
  )
  return np.concatenate([labels[:, :1], xyxy], axis=1).astype(np.float32)


def pixels_to_normalized(labels: np.ndarray, *, width: float, height: float) -> np.ndarray:
  """``[N, 5]`` pixel ``(class, x1, y1, x2, y2)`` to normalised ``(class, cx, cy, w, h)``."""
  labels = np.asarray(labels, np.float32).reshape(-1, 5)
  cxcywh = box_lib.pixel_xyxy_to_normalized_cxcywh(labels[:, 1:], width=width, height=height, xp=np)
  return np.concatenate([labels[:, :1], cxcywh], axis=1).astype(np.float32)


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
  labels[:, 1:] = box_lib.scale_xyxy(
    labels[:, 1:], sx=new_w / w, sy=new_h / h, dx=left, dy=top, xp=np
  )
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
