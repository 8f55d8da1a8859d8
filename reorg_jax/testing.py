"""Seeded random scenes and head outputs for tests, benchmarks and notebooks.

Glossary: ``B`` batch, ``N`` label rows, ``L`` levels, ``A`` anchors per level,
``M`` max boxes per image, ``C`` classes, ``F = 5 + C``, ``H_l``/``W_l`` the
grid of level ``l``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.loss._config import LossConfig
from reorg_jax.targets import Targets

__all__ = [
  'ONE_BRANCH',
  'Scene',
  'make_scene',
  'random_head_outputs',
  'random_labels',
  'random_scene',
]

# The loss's speed settings at their simplest (LossConfig fields): one capacity, one image
# group, so one branch for XLA to compile instead of the defaults' 12. The results do not
# depend on them (tests/test_compact.py); tests whose subject is not the packed loss use it.
ONE_BRANCH = {'capacity_fractions': (), 'batch_groups': 1}


def random_labels(
  rng: np.random.Generator,
  *,
  boxes_per_image: list[int],
  num_classes: int,
  image_hw: tuple[int, int],
  min_size: float = 2.0,
  border_fraction: float = 0.15,
) -> np.ndarray:
  """COCO-like boxes as upstream's flat label rows.

  Widths and heights are log-uniform between ``min_size`` pixels and the image
  side; a ``border_fraction`` of boxes is pushed against an image border.
  Boxes are clipped to the image like upstream's data loader does.

  Args:
    rng: NumPy generator (the seed decides everything).
    boxes_per_image: ``B`` counts; 0 gives an empty image.
    num_classes: ``C``.
    image_hw: ``(H, W)`` in pixels.
    min_size: smallest side in pixels.
    border_fraction: share of boxes touching a border.

  Returns:
    ``[N, 6]`` float32 rows ``(image, class, cx, cy, w, h)``, normalised.
  """
  height, width = image_hw
  rows = []
  for image, count in enumerate(boxes_per_image):
    if count == 0:
      continue
    side = np.array([width, height], np.float64)
    wh = np.exp(rng.uniform(np.log(min_size), np.log(side), size=(count, 2)))
    centre = rng.uniform(0, side, size=(count, 2))
    x1y1 = np.clip(centre - wh / 2, 0, side)
    x2y2 = np.clip(centre + wh / 2, 0, side)
    touch = rng.random(count) < border_fraction
    which = rng.integers(0, 4, size=count)
    for i in np.flatnonzero(touch):
      axis, high = which[i] % 2, which[i] // 2
      extent = x2y2[i, axis] - x1y1[i, axis]
      if high:
        x1y1[i, axis], x2y2[i, axis] = side[axis] - extent, side[axis]
      else:
        x1y1[i, axis], x2y2[i, axis] = 0.0, extent
    xywh = np.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=1) / np.tile(side, 2)
    keep = (xywh[:, 2:] > 0).all(axis=1)
    classes = rng.integers(0, num_classes, size=count)
    block = np.concatenate([np.full((count, 1), image), classes[:, None], xywh], axis=1)[keep]
    rows.append(block)
  if not rows:
    return np.zeros((0, 6), np.float32)
  return np.concatenate(rows).astype(np.float32)


def random_head_outputs(
  rng: np.random.Generator,
  config: LossConfig,
  *,
  batch_size: int,
  image_hw: tuple[int, int],
  heads: int = 2,
  scale: float = 1.5,
) -> list[np.ndarray]:
  """Random raw head outputs ``[B, A, H_l, W_l, 5 + C]``: ``heads * L`` arrays, lead first.

  Logits are normal with standard deviation ``scale``, objectness shifted
  down by 4 as in a detector early in training.
  """
  height, width = image_hw
  outputs = []
  for _ in range(heads):
    for stride in config.strides:
      shape = (batch_size, config.num_anchors, height // stride, width // stride)
      out = rng.normal(0.0, scale, size=(*shape, 5 + config.num_classes))
      out[..., 4] -= 4.0
      outputs.append(out.astype(np.float32))
  return outputs


def random_scene(
  seed: int | np.random.Generator,
  boxes_per_image: list[int],
  *,
  num_classes: int = 5,
  max_boxes: int = 12,
  image_hw: tuple[int, int] = (320, 320),
  corner_centres: bool = False,
  **config_overrides,
) -> tuple[LossConfig, Targets, list[jax.Array]]:
  """A P6 loss config, random boxes and random head outputs: the scene of the loss tests.

  Args:
    seed: seeds one NumPy generator, or is one (drawn on from where it
      stands, e.g. after the caller drew ``boxes_per_image`` from it); drawn
      first for the labels (:func:`random_labels`), then for the outputs
      (:func:`random_head_outputs`).
    boxes_per_image: ``B`` box counts.
    num_classes: ``C``.
    max_boxes: ``M``.
    image_hw: ``(H, W)`` in pixels.
    corner_centres: snap box centres to multiples of 1/16 of the image (inside
      ``[1/16, 15/16]``): at 320 and 640 px these lie on cell corners of every
      level, where the fine right/down neighbour is the centre cell itself.
    **config_overrides: fields of :meth:`LossConfig.p6`.

  Returns:
    ``(config, targets, outputs)``: ``targets`` ``[B, M, ...]`` and ``2L``
    outputs ``[B, A, H_l, W_l, F]`` (lead, then auxiliary). Upstream's label
    rows of the scene (``[N, 6]`` ``(image, class, cx, cy, w, h)``,
    normalised, as the reference loss takes them) are ``targets.to_yolo()``:
    the rows :func:`random_labels` drew, in the same order.
  """
  rng = np.random.default_rng(seed)
  config = LossConfig.p6(num_classes, **config_overrides)
  labels = random_labels(
    rng, boxes_per_image=boxes_per_image, num_classes=num_classes, image_hw=image_hw
  )
  if corner_centres:
    labels[:, 2:4] = np.round(labels[:, 2:4] * 16) / 16
    labels[:, 2:4] = np.clip(labels[:, 2:4], 1 / 16, 15 / 16)
  batch = len(boxes_per_image)
  targets = Targets.from_yolo(labels, batch, max_boxes, num_classes=num_classes)
  outputs = random_head_outputs(rng, config, batch_size=batch, image_hw=image_hw)
  return config, targets, [jnp.asarray(o) for o in outputs]


@dataclasses.dataclass(frozen=True)
class Scene:
  """A seeded loss scene: ``B`` images of ``S`` px with up to ``max_count`` boxes each.

  The parity tests, the notebooks and the figures build their scenes from it
  (:func:`make_scene`).
  """

  seed: int
  batch: int
  size: int
  num_classes: int
  max_count: int
  max_boxes: int = 64
  empty_images: int = 0
  # The loss's speed settings at their simplest (one image group, no capacity ladder): one
  # branch to compile instead of twelve. The result does not depend on them
  # (tests/test_compact.py); the crowded B=8 scenes keep the defaults.
  flat: bool = False

  def __str__(self):
    return (
      f'seed{self.seed}-B{self.batch}-{self.size}px-C{self.num_classes}-upto{self.max_count}'
      f'-empty{self.empty_images}' + ('-flat' if self.flat else '')
    )


def make_scene(scene: Scene) -> tuple[LossConfig, tuple[int, int], Targets, list[np.ndarray]]:
  """``(config, hw, targets, outputs)`` of ``scene``, ``outputs`` as ``2L`` NumPy arrays.

  The box count of each image is drawn first, then the rest of the scene
  (:func:`reorg_jax.testing.random_scene`) from the same generator.
  Upstream's label rows are ``targets.to_yolo()``.
  """
  rng = np.random.default_rng(scene.seed)
  counts = list(rng.integers(0, scene.max_count + 1, size=scene.batch))
  counts[: scene.empty_images] = [0] * scene.empty_images
  hw = (scene.size, scene.size)
  flat = ONE_BRANCH if scene.flat else {}
  config, targets, outputs = random_scene(
    rng, counts, num_classes=scene.num_classes, max_boxes=scene.max_boxes, image_hw=hw, **flat
  )
  return config, hw, targets, [np.array(o) for o in outputs]  # writable, for torch
