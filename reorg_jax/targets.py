"""Ground-truth boxes padded to a fixed count per image, with an explicit mask.

Glossary: ``B`` batch, ``M`` max boxes per image, ``N`` label rows, ``C``
classes.

Boxes are normalised ``cxcywh`` (:mod:`reorg_jax.boxes`' name for centre x,
centre y, width, height); :meth:`Targets.from_yolo` packs upstream's ``[N, 6]``
label rows ``(image, class, cx, cy, w, h)`` into ``[B, M, ...]`` arrays.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['Targets']


@flax.struct.dataclass
class Targets:
  """Boxes of a batch, padded to ``M`` per image.

  Attributes:
    boxes: ``[B, M, 4]`` float, normalised ``(cx, cy, w, h)`` in image units
      (``[0, 1]`` spans the image width for x and w, its height for y and h).
    classes: ``[B, M]`` int32 class ids.
    valid: ``[B, M]`` bool; ``False`` rows are padding and their other fields
      are never read.
    num_classes: ``C`` the classes were checked against (static; set by
      :meth:`from_yolo`), or ``None`` when unknown. The loss refuses targets
      whose ``C`` differs from its own.
  """

  boxes: jax.Array
  classes: jax.Array
  valid: jax.Array
  num_classes: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def batch_size(self) -> int:
    """``B``."""
    return self.boxes.shape[0]

  @property
  def max_boxes(self) -> int:
    """``M``."""
    return self.boxes.shape[1]

  @classmethod
  def from_yolo(
    cls,
    labels: np.ndarray,
    batch_size: int,
    max_boxes: int,
    *,
    num_classes: int,
    coord_tolerance: float = 0.05,
  ) -> Targets:
    """Packs upstream's flat label rows into padded arrays, validating them.

    Runs on the host (NumPy): it checks values, so it must see them.

    Args:
      labels: ``[N, 6]`` rows ``(image, class, cx, cy, w, h)`` as upstream's
        data loader yields them; box order within an image is kept.
      batch_size: ``B``.
      max_boxes: ``M``; an image with more boxes is an error, never truncated.
      num_classes: ``C``; classes must lie in ``[0, C)``.
      coord_tolerance: how far centres may lie outside ``[0, 1]`` and sizes
        exceed 1 before the row is rejected.

    Returns:
      ``Targets`` with ``[B, M, ...]`` fields.

    Raises:
      ValueError: naming the offending rows: wrong shape, non-finite values,
        non-integer or out-of-range image index or class, negative size,
        coordinates far outside the image, or more than ``max_boxes`` boxes in
        an image (naming the image and its count).
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != 6:
      if labels.size == 0:
        labels = labels.reshape(0, 6)
      else:
        raise ValueError(
          f'labels must have shape [N, 6] (image, class, cx, cy, w, h), got {labels.shape}'
        )
    if batch_size < 1 or max_boxes < 1:
      raise ValueError(f'batch_size and max_boxes must be >= 1, got {batch_size} and {max_boxes}')

    def reject(mask: np.ndarray, what: str) -> None:
      rows = np.flatnonzero(mask)
      if rows.size:
        shown = ', '.join(str(r) for r in rows[:10]) + (' ...' if rows.size > 10 else '')
        raise ValueError(
          f'{rows.size} label row(s) {what}: rows {shown}; first: {labels[rows[0]].tolist()}'
        )

    reject(~np.isfinite(labels).all(axis=1), 'contain NaN or inf')
    image, label_class, xywh = labels[:, 0], labels[:, 1], labels[:, 2:]
    reject(image != np.round(image), 'have a non-integer image index')
    reject((image < 0) | (image >= batch_size), f'have an image index outside [0, {batch_size})')
    reject(label_class != np.round(label_class), 'have a non-integer class')
    reject(
      (label_class < 0) | (label_class >= num_classes), f'have a class outside [0, {num_classes})'
    )
    reject((xywh[:, 2:] < 0).any(axis=1), 'have a negative width or height')
    lo, hi = -coord_tolerance, 1 + coord_tolerance
    reject(
      ((xywh[:, :2] < lo) | (xywh[:, :2] > hi)).any(axis=1), f'have a centre outside [{lo}, {hi}]'
    )
    reject((xywh[:, 2:] > hi).any(axis=1), f'have a width or height above {hi}')

    image = image.astype(np.int64)
    counts = np.bincount(image, minlength=batch_size)
    if counts.max(initial=0) > max_boxes:
      over = np.flatnonzero(counts > max_boxes)
      detail = ', '.join(f'image {i}: {counts[i]} boxes' for i in over)
      raise ValueError(f'more than max_boxes={max_boxes} boxes in {detail}; raise max_boxes')

    order = np.argsort(image, kind='stable')
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(image)) - starts[image[order]]
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    classes = np.zeros((batch_size, max_boxes), np.int32)
    valid = np.zeros((batch_size, max_boxes), bool)
    boxes[image[order], slot] = xywh[order]
    classes[image[order], slot] = label_class[order]
    valid[image[order], slot] = True
    return cls(
      boxes=jnp.asarray(boxes),
      classes=jnp.asarray(classes),
      valid=jnp.asarray(valid),
      num_classes=num_classes,
    )

  def to_yolo(self) -> np.ndarray:
    """Inverse of :meth:`from_yolo`: ``[N, 6]`` float32 rows of the valid boxes, image-major."""
    valid = np.asarray(self.valid)
    image, slot = np.nonzero(valid)
    rows = np.concatenate(
      [
        image[:, None].astype(np.float32),
        np.asarray(self.classes)[image, slot, None].astype(np.float32),
        np.asarray(self.boxes)[image, slot],
      ],
      axis=1,
    )
    return rows.astype(np.float32)
