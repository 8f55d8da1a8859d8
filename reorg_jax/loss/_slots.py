"""The candidate-slot layout: the one place that knows what slot ``k`` is.

Glossary: ``B`` batch, ``L`` levels, ``O = 5`` cell offsets (centre, left,
up, right, down), ``A`` anchors per level, ``M`` max boxes per image,
``K = L * O * A * M`` candidate slots per image, ``S = K / L`` slots per
level, ``N`` any number of slots picked per image, ``C`` classes,
``F = 5 + C``, ``H_l``/``W_l`` the grid of level ``l``.

Every image owns ``K`` candidate slots laid out as ``[L, O, A, M]``: slot
``((l * O + o) * A + a) * M + m`` is "box ``m``, anchor ``a``, offset ``o`` on
level ``l``". That is the order upstream's ``find_3_positive`` /
``find_5_positive`` produce candidates in (level, then offset, then anchor,
then box, within an image), so positions, tie-breaks and the order in which
duplicate positives write objectness all follow upstream.

Head outputs ``[B, A, H_l, W_l, F]`` are read as one table per image: the
``L`` levels' ``A * H_l * W_l`` cells concatenated, cell ``(a, gj, gi)`` of
level ``l`` at row ``first_row[l] + (a * H_l + gj) * W_l + gi``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.loss._config import LossConfig
from reorg_jax.models.detect import decode_cxcywh

__all__ = ['NUM_OFFSETS', 'SlotLayout', 'take_rows']

NUM_OFFSETS = 5


def take_rows(values: jax.Array, index: jax.Array) -> jax.Array:
  """Per image, ``values[b][index[b]]``: ``[B, K, ...]`` by ``[B, N]`` to ``[B, N, ...]``."""
  return jax.vmap(lambda v, i: v[i])(values, index)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """Static level, offset, anchor and box of every slot, and where its cell sits.

  Frozen and hashable, built from static shapes only; every array it returns
  is a NumPy constant (or, for the row functions, jnp arithmetic on the
  caller's indices).

  Attributes:
    config: head geometry (``L``, ``A``, anchors, strides, balance).
    grids: ``L`` grid shapes ``(H_l, W_l)``.
    max_boxes: ``M``.
  """

  config: LossConfig
  grids: tuple[tuple[int, int], ...]
  max_boxes: int

  def __post_init__(self):
    grids = tuple((int(h), int(w)) for h, w in self.grids)
    object.__setattr__(self, 'grids', grids)
    if len(grids) != self.config.num_levels:
      raise ValueError(f'expected {self.config.num_levels} grid shapes, got {len(grids)}')
    if self.max_boxes < 1:
      raise ValueError(f'max_boxes must be >= 1, got {self.max_boxes}')

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """``(L, O, A, M)``."""
    return (self.config.num_levels, NUM_OFFSETS, self.config.num_anchors, self.max_boxes)

  @property
  def num_slots(self) -> int:
    """``K``."""
    return int(np.prod(self.shape))

  @property
  def slots_per_level(self) -> int:
    """``S = K / L``."""
    return self.num_slots // self.config.num_levels

  def level_slice(self, level: int) -> slice:
    """The ``S`` slots of ``level``, contiguous."""
    return slice(level * self.slots_per_level, (level + 1) * self.slots_per_level)

  def _index(self, axis: int) -> np.ndarray:
    index = np.arange(self.shape[axis]).reshape([-1 if a == axis else 1 for a in range(4)])
    return np.broadcast_to(index, self.shape).reshape(-1).astype(np.int32)

  @functools.cached_property
  def level(self) -> np.ndarray:
    """``[K]`` int32 level of each slot."""
    return self._index(0)

  @functools.cached_property
  def offset(self) -> np.ndarray:
    """``[K]`` int32 cell offset of each slot (0 is the centre)."""
    return self._index(1)

  @functools.cached_property
  def anchor(self) -> np.ndarray:
    """``[K]`` int32 anchor of each slot within its level."""
    return self._index(2)

  @functools.cached_property
  def box(self) -> np.ndarray:
    """``[K]`` int32 box (``Targets`` row) that proposed each slot."""
    return self._index(3)

  @functools.cached_property
  def centre_slot(self) -> np.ndarray:
    """``[K]`` int32 slot of the centre offset with the same level, anchor and box."""
    per_offset = self.config.num_anchors * self.max_boxes
    return (np.arange(self.num_slots) - self.offset * per_offset).astype(np.int32)

  @functools.cached_property
  def stride(self) -> np.ndarray:
    """``[K]`` float32 stride of each slot's level."""
    return np.asarray(self.config.strides, np.float32)[self.level]

  @functools.cached_property
  def anchor_wh(self) -> np.ndarray:
    """``[K, 2]`` float32 anchor of each slot in grid cells of its level."""
    return self.level_anchors()[self.level, self.anchor]

  @functools.cached_property
  def grid_wh(self) -> np.ndarray:
    """``[K, 2]`` float32 ``(W_l, H_l)`` of each slot's level."""
    grid = np.asarray(self.grids, np.float32)[:, ::-1]
    return np.ascontiguousarray(grid[self.level])

  def level_anchors(self) -> np.ndarray:
    """``[L, A, 2]`` float32 anchors divided by their level's stride."""
    return (
      np.asarray(self.config.anchors, np.float32)
      / np.asarray(self.config.strides, np.float32)[:, None, None]
    )

  def level_cells(self, level: int) -> int:
    """``A * H_l * W_l`` cells of one image at ``level``."""
    grid_h, grid_w = self.grids[level]
    return self.config.num_anchors * grid_h * grid_w

  @property
  def num_cells(self) -> int:
    """Cells of one image over all levels: the rows of the concatenated table."""
    return sum(self.level_cells(level) for level in range(self.config.num_levels))

  def objectness_weight(self, batch: int) -> tuple[float, ...]:
    """``L`` weights ``balance[l] / (B * A * H_l * W_l)``: the objectness mean of a level."""
    return tuple(
      self.config.balance[level] / (batch * self.level_cells(level))
      for level in range(self.config.num_levels)
    )

  def level_row(self, level: int, anchor: jax.Array, gj: jax.Array, gi: jax.Array) -> jax.Array:
    """Row ``(a * H_l + gj) * W_l + gi`` of cells in one level's ``[A * H_l * W_l]`` table."""
    grid_h, grid_w = self.grids[level]
    return (anchor * grid_h + gj) * grid_w + gi

  def cell_row(self, slot: jax.Array, gj: jax.Array, gi: jax.Array) -> jax.Array:
    """Row of each slot's cell in the ``L`` levels' tables concatenated (same shape as ``slot``).

    Args:
      slot: int slot indices.
      gj, gi: the cells (grid row and column) of those slots.
    """
    grid = np.asarray(self.grids, np.int32)  # [L, 2] (H, W)
    cells = np.asarray([self.level_cells(lv) for lv in range(len(self.grids))], np.int32)
    first_row = np.concatenate([[0], np.cumsum(cells)[:-1]]).astype(np.int32)
    level = jnp.asarray(self.level)[slot]
    anchor = jnp.asarray(self.anchor)[slot]
    grid_h, grid_w = jnp.asarray(grid[:, 0])[level], jnp.asarray(grid[:, 1])[level]
    return jnp.asarray(first_row)[level] + (anchor * grid_h + gj) * grid_w + gi

  def from_levels(self, parts: Sequence[jax.Array]) -> jax.Array:
    """``L`` per-level ``[B, O, A, M]`` arrays to one ``[B, K]`` array in slot order."""
    batch = parts[0].shape[0]
    return jnp.stack(parts, axis=1).reshape(batch, self.num_slots)

  def decode(
    self,
    preds: jax.Array,
    slot: jax.Array,
    *,
    cells: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """``[B, N, 4]`` ``cxcywh`` boxes of raw predictions at ``[B, N]`` slots.

    Args:
      preds: ``[B, N, F]`` raw logits (only the first four are read).
      slot: ``[B, N]`` slot of each prediction (or ``[N]``, the same for every image).
      cells: ``(gj, gi)``, ``[B, N]`` each: boxes in input pixels. Without
        them, in grid cells of the slot's level relative to its cell's corner,
        as the box loss compares them.
    """
    anchor_wh = jnp.asarray(self.anchor_wh)[slot]
    if cells is None:
      return decode_cxcywh(jax.nn.sigmoid(preds[..., :4]), anchor_wh=anchor_wh)
    gj, gi = cells
    cell_xy = jnp.stack([gi, gj], axis=-1).astype(jnp.float32)
    stride = jnp.asarray(self.stride)[slot][..., None]
    return decode_cxcywh(
      jax.nn.sigmoid(preds[..., :4]), anchor_wh=anchor_wh, cell_xy=cell_xy, stride=stride
    )
